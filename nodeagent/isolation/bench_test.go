package isolation_test

import (
	"context"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/isolation"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// BenchmarkVerify measures one Verify of a Production profile with one sibling on a real systemd
// host: "repeat" reuses the exposure score (the usual re-prove), "measure" runs
// systemd-analyze too (the first Verify after a unit file changed). The probe unit is installed
// before timing starts. Each Verify includes one dropped connection (ConnectTimeout).
func BenchmarkVerify(b *testing.B) {
	f := startTwoProfiles(b)
	run := func(b *testing.B, v *isolation.Verifier) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		ev, err := v.Verify(ctx, f.core, f.settings(f.core), []layout.Profile{f.api})
		if err != nil || !ev.Isolated {
			b.Fatalf("verify: %v %s", err, ev.Message())
		}
	}
	run(b, f.verifier)
	b.Run("repeat", func(b *testing.B) {
		for b.Loop() {
			run(b, f.verifier)
		}
	})
	b.Run("measure", func(b *testing.B) {
		for b.Loop() {
			run(b, &isolation.Verifier{Systemd: f.verifier.Systemd, Host: f.verifier.Host})
		}
	})
	b.Run("repeat-connect-50ms", func(b *testing.B) {
		v := &isolation.Verifier{Systemd: f.verifier.Systemd, Host: f.verifier.Host, ConnectTimeout: 50 * time.Millisecond}
		run(b, v)
		b.ResetTimer()
		for b.Loop() {
			run(b, v)
		}
	})
}
