package controllers_test

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// BenchmarkToolRunPodLatency measures, against the real API server, the time from creating a
// ToolRun to its Pod existing (the API side of a tool run's start; no kubelet runs here),
// over 50 runs.
func BenchmarkToolRunPodLatency(b *testing.B) {
	ctx := context.Background()
	ensureKata(b)
	var lat []time.Duration
	for i := 0; i < 50*b.N; i++ { // 50 runs per iteration, so that p95 means something
		tr := toolRun(fmt.Sprintf("lat-%d-%d", time.Now().UnixNano()%1e6, i))
		start := time.Now()
		if err := c.Create(ctx, tr); err != nil {
			b.Fatal(err)
		}
		for {
			err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "trun-" + tr.Name}, &corev1.Pod{})
			if err == nil {
				break
			}
			if time.Since(start) > 30*time.Second {
				b.Fatalf("no pod for %s: %v", tr.Name, err)
			}
			time.Sleep(2 * time.Millisecond)
		}
		lat = append(lat, time.Since(start))
		_ = c.Delete(ctx, tr)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(q(0.50), "create-to-pod-p50-ms")
	b.ReportMetric(q(0.95), "create-to-pod-p95-ms")
}
