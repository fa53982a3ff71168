package apply_test

import (
	"context"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// BenchmarkReleaseSwitch measures a per-host release switch with both releases already staged
// (flip + restart + prove, through Apply) over 20 switches and, in the same run, three baselines
// of 20 bare restarts of the same unit each: the `systemctl restart` command run on the host
// ("systemctl"), a restart over systemd's D-Bus API timed until the job is done ("restart"), and
// the same timed until the restarted gateway answers on its status endpoint ("restart-ready"),
// which is the part of a switch no agent can avoid. It reports p50 and p95 of each, and ratios.
func BenchmarkReleaseSwitch(b *testing.B) {
	const switches = 20
	f := newFixture(b, systemdhost.Options{})
	rels := []release.Artifact{
		f.publish(agentruntime.Options{Version: "1.0.0"}),
		f.publish(agentruntime.Options{Version: "2.0.0"}),
	}
	f.mustApply(instance("api", rels[0])) // a sibling, proven untouched on every switch
	f.mustApply(instance("core", rels[1]))
	f.mustApply(instance("core", rels[0]))
	ctx := context.Background()

	for n := 0; n < b.N; n++ {
		var sw, cli, bare, ready []time.Duration
		for i := 0; i < switches; i++ {
			start := time.Now()
			out := f.mustApply(instance("core", rels[(i+1)%2]))
			sw = append(sw, time.Since(start))
			if !out.Restarted {
				b.Fatal("a switch did not restart the unit")
			}
		}
		for i := 0; i < switches; i++ {
			_ = f.applier.Systemd.ResetFailed(ctx, layout.Unit("core"))
			start := time.Now()
			if out, err := f.host.Systemctl(ctx, "restart", layout.Unit("core")); err != nil {
				b.Fatalf("systemctl restart: %v: %s", err, out)
			}
			cli = append(cli, time.Since(start))
			waitAnswer(b, f, "core")
		}
		for i := 0; i < switches; i++ {
			// Like Apply, clear systemd's start rate limit first (untimed), or 20 quick restarts
			// trip it.
			_ = f.applier.Systemd.ResetFailed(ctx, layout.Unit("core"))
			start := time.Now()
			if err := f.applier.Systemd.Restart(ctx, layout.Unit("core")); err != nil {
				b.Fatal(err)
			}
			bare = append(bare, time.Since(start))
			waitAnswer(b, f, "core")
			ready = append(ready, time.Since(start))
		}
		p50s, p95s := percentile(sw, 50), percentile(sw, 95)
		p50c, p95c := percentile(cli, 50), percentile(cli, 95)
		b.ReportMetric(ms(p50c), "systemctl-p50-ms")
		b.ReportMetric(ms(p95c), "systemctl-p95-ms")
		b.ReportMetric(ms(p50s)/ms(p50c), "p50-ratio-to-systemctl")
		p50b, p95b := percentile(bare, 50), percentile(bare, 95)
		b.ReportMetric(ms(p50s), "switch-p50-ms")
		b.ReportMetric(ms(p95s), "switch-p95-ms")
		b.ReportMetric(ms(p50b), "restart-p50-ms")
		b.ReportMetric(ms(p95b), "restart-p95-ms")
		p50r, p95r := percentile(ready, 50), percentile(ready, 95)
		b.ReportMetric(ms(p50r), "restart-ready-p50-ms")
		b.ReportMetric(ms(p95r), "restart-ready-p95-ms")
		b.ReportMetric(ms(p50s)/ms(p50b), "p50-ratio-to-restart")
		b.ReportMetric(ms(p50s)/ms(p50r), "p50-ratio-to-restart-ready")
	}
}

// waitAnswer polls a gateway's status endpoint as Apply's proof does, every 5ms.
func waitAnswer(b *testing.B, f *fixture, profile string) {
	sock := filepath.Join(f.host.Root, "opt/agent/gateways", profile, "home/run/status.sock")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := agentruntime.GetStatus(context.Background(), sock); err == nil {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s did not answer after a restart", profile)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func percentile(ds []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p+99)/100 - 1
	if i < 0 {
		i = 0
	}
	return s[i]
}
