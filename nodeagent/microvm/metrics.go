package microvm

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Tool-run metrics, served on the agent's metrics endpoint.
var (
	runsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gateway_agent_toolruns_total",
		Help: "Host-local tool runs by profile and phase (Succeeded, Failed, TimedOut, Rejected, Error).",
	}, []string{"profile", "phase"})
	runSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "gateway_agent_toolrun_duration_seconds",
		Help:    "Wall time of host-local tool runs that booted a microVM, from request to reply.",
		Buckets: []float64{0.5, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300, 600},
	}, []string{"profile"})
)

func init() {
	metrics.Registry.MustRegister(runsTotal, runSeconds)
}
