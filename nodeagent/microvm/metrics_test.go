package microvm

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// The tool-run metrics are on the registry the agent serves, with their help texts.
func TestToolRunMetricsAreRegistered(t *testing.T) {
	runsTotal.WithLabelValues("metrics-test", string(Rejected)).Inc()
	runSeconds.WithLabelValues("metrics-test").Observe(1.7)
	want := `
# HELP gateway_agent_toolruns_total Host-local tool runs by profile and phase (Succeeded, Failed, TimedOut, Rejected, Error).
# TYPE gateway_agent_toolruns_total counter
gateway_agent_toolruns_total{phase="Rejected",profile="metrics-test"} 1
`
	if err := testutil.GatherAndCompare(metrics.Registry, strings.NewReader(want), "gateway_agent_toolruns_total"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(runSeconds, "gateway_agent_toolrun_duration_seconds"); n != 1 {
		t.Fatalf("%d duration series, want 1", n)
	}
}
