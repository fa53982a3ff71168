// Package bench measures the controller manager on a large simulated fleet: the real API server
// and the real manager binary, with the hosts' agents simulated in this process (no kubelet or
// thousands of systemd hosts can run here). Run it with `make bench`.
package bench

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/stack"
)

const (
	hosts       = 1000
	profiles    = 3
	metricsAddr = "127.0.0.1:18480"
)

// BenchmarkFleetRolloutSimulatedAgents rolls a new release over 1,000 simulated hosts × 3
// profiles at maxUnavailable 10% and reports the manager's side of it: CPU time and reconcile
// time spent, peak RSS, API writes, and reconcile latency quantiles (interpolated from the
// manager's own histogram).
func BenchmarkFleetRolloutSimulatedAgents(b *testing.B) {
	for n := 0; n < b.N; n++ {
		run(b)
	}
}

func run(b *testing.B) {
	ctx := context.Background()
	bin := b.TempDir()
	if err := stack.Build(bin); err != nil {
		b.Fatal(err)
	}
	s, err := stack.Up(stack.Options{Dir: b.TempDir(), BinDir: bin, ManagerMetricsAddr: metricsAddr, HostGracePeriod: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.Down() }()
	c := s.CP.Client

	// The fleet: hosts that heart-beat once (the grace period outlasts the run), two releases.
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i := 0; i < hosts; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			h := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("host-%04d", i)}}
			if err := c.Create(ctx, h); err != nil {
				b.Error(err)
				return
			}
			now := metav1.Now()
			h.Status.LastHeartbeatTime = &now
			if err := c.Status().Update(ctx, h); err != nil {
				b.Error(err)
			}
		}(i)
	}
	wg.Wait()
	for i, sha := range []string{strings.Repeat("1", 64), strings.Repeat("2", 64)} {
		r := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("r%d", i+1)}, Spec: v1.ReleaseSpec{
			Source: v1.ReleaseSource{URL: "https://releases.example.com/r.tar.gz"}, SHA256: sha, Label: fmt.Sprintf("%d.0.0", i+1)}}
		if err := c.Create(ctx, r); err != nil {
			b.Fatal(err)
		}
	}

	agents := startAgents(b, s)
	defer agents.stop()

	tenPct := intstr.FromString("10%")
	for i := 0; i < profiles; i++ {
		p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i)},
			Spec: v1.GatewayProfileSpec{Release: "r1", Rollout: v1.RolloutStrategy{MaxUnavailable: &tenPct}}}
		if err := c.Create(ctx, p); err != nil {
			b.Fatal(err)
		}
	}
	waitComplete(b, c, "1.0.0")

	before := scrape(b)
	cpu0 := cpuTime(s.ManagerPID)
	start := time.Now()
	for i := 0; i < profiles; i++ {
		p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i)}}
		if err := c.Patch(ctx, p, client.RawPatch(types.MergePatchType, []byte(`{"spec":{"release":"r2"}}`))); err != nil {
			b.Fatal(err)
		}
	}
	waitComplete(b, c, "2.0.0")
	wall := time.Since(start)
	after := scrape(b)
	cpu := cpuTime(s.ManagerPID) - cpu0

	writes := 0.0
	for _, m := range []string{"POST", "PUT", "PATCH", "DELETE"} {
		writes += after.get("rest_client_requests_total", "method", m) - before.get("rest_client_requests_total", "method", m)
	}
	reconcileSum := after.get("controller_runtime_reconcile_time_seconds_sum", "controller", "gatewayprofile") -
		before.get("controller_runtime_reconcile_time_seconds_sum", "controller", "gatewayprofile")
	reconciles := after.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayprofile") -
		before.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayprofile")
	b.ReportMetric(wall.Seconds(), "rollout-wall-s")
	b.ReportMetric(cpu.Seconds(), "manager-cpu-s")
	b.ReportMetric(reconcileSum, "reconcile-total-s")
	b.ReportMetric(reconciles, "reconciles")
	b.ReportMetric(float64(peakRSS(s.ManagerPID))/(1<<20), "manager-peak-rss-MiB")
	b.ReportMetric(writes, "api-writes")
	b.ReportMetric(writes/float64(hosts*profiles), "writes-per-instance")
	b.ReportMetric(1000*after.quantile(before, 0.50), "reconcile-p50-ms")
	b.ReportMetric(1000*after.quantile(before, 0.99), "reconcile-p99-ms")
	b.ReportMetric(float64(agents.applied.Load()), "simulated-applies")
}

func waitComplete(b *testing.B, c client.Client, label string) {
	deadline := time.Now().Add(15 * time.Minute)
	for time.Now().Before(deadline) {
		var list v1.GatewayProfileList
		if err := c.List(context.Background(), &list); err == nil {
			done := 0
			for _, p := range list.Items {
				if r := p.Status.Rollout; r != nil && r.Phase == v1.RolloutComplete && r.To != nil && r.To.Label == label &&
					p.Status.Aligned == hosts {
					done++
				}
			}
			if done == profiles {
				return
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	b.Fatalf("rollout of %s did not complete", label)
}

// agents simulate every host's agent: an instance whose spec changed is reported aligned a
// moment later, as a real agent would after its apply.
type agents struct {
	applied atomic.Int64
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func startAgents(b *testing.B, s *stack.Stack) *agents {
	ic, err := cache.New(s.CP.Config, cache.Options{Scheme: s.CP.Scheme})
	if err != nil {
		b.Fatal(err)
	}
	inf, err := ic.GetInformer(context.Background(), &v1.GatewayInstance{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agents{cancel: cancel}
	work := make(chan client.ObjectKey, 10000)
	enqueue := func(o any) {
		gi, ok := o.(*v1.GatewayInstance)
		if ok && (gi.Status.ObservedGeneration != gi.Generation || gi.Status.ConfigHash != gi.Spec.ConfigHash) {
			work <- client.ObjectKeyFromObject(gi)
		}
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, n any) { enqueue(n) },
	}); err != nil {
		b.Fatal(err)
	}
	go func() { _ = ic.Start(ctx) }()
	c := s.CP.Client
	for w := 0; w < 8; w++ {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case key := <-work:
					time.Sleep(20 * time.Millisecond) // the apply itself
					var gi v1.GatewayInstance
					if err := c.Get(ctx, key, &gi); err != nil || (gi.Status.ObservedGeneration == gi.Generation && gi.Status.ConfigHash == gi.Spec.ConfigHash) {
						continue
					}
					base := gi.DeepCopy()
					gen := gi.Generation
					gi.Status.ObservedGeneration, gi.Status.ConfigHash = gen, gi.Spec.ConfigHash
					gi.Status.CurrentRelease = &v1.ReleaseSummary{Name: gi.Spec.Release.Name, Label: gi.Spec.Release.Label, SHA256: gi.Spec.Release.SHA256}
					meta.SetStatusCondition(&gi.Status.Conditions, metav1.Condition{Type: v1.ConditionAligned, Status: metav1.ConditionTrue, Reason: "Proven", ObservedGeneration: gen})
					meta.SetStatusCondition(&gi.Status.Conditions, metav1.Condition{Type: v1.ConditionDegraded, Status: metav1.ConditionFalse, Reason: "Applied", ObservedGeneration: gen})
					if err := c.Status().Patch(ctx, &gi, client.MergeFrom(base)); err == nil {
						a.applied.Add(1)
					}
				}
			}
		}()
	}
	return a
}

func (a *agents) stop() { a.cancel(); a.wg.Wait() }

// metrics is one scrape of the manager's Prometheus endpoint.
type metrics map[string]float64

func scrape(b *testing.B) metrics {
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	m := metrics{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			m[line[:i]] = v
		}
	}
	return m
}

// get sums a metric over the series whose label has the value.
func (m metrics) get(name, label, value string) float64 {
	sum := 0.0
	for k, v := range m {
		if (strings.HasPrefix(k, name+"{") || k == name) && strings.Contains(k, label+`="`+value+`"`) {
			sum += v
		}
	}
	return sum
}

// quantile interpolates a quantile of the gatewayprofile reconcile-time histogram between two
// scrapes.
func (m metrics) quantile(before metrics, q float64) float64 {
	type bucket struct{ le, count float64 }
	var bs []bucket
	for k, v := range m {
		if !strings.HasPrefix(k, "controller_runtime_reconcile_time_seconds_bucket{") || !strings.Contains(k, `controller="gatewayprofile"`) {
			continue
		}
		i := strings.Index(k, `le="`)
		le := k[i+4:]
		le = le[:strings.IndexByte(le, '"')]
		bound := math.Inf(1)
		if le != "+Inf" {
			bound, _ = strconv.ParseFloat(le, 64)
		}
		bs = append(bs, bucket{bound, v - before[k]})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	if len(bs) == 0 || bs[len(bs)-1].count == 0 {
		return 0
	}
	rank := q * bs[len(bs)-1].count
	prevLe, prevCount := 0.0, 0.0
	for _, bk := range bs {
		if bk.count >= rank {
			if math.IsInf(bk.le, 1) {
				return prevLe
			}
			return prevLe + (bk.le-prevLe)*(rank-prevCount)/math.Max(bk.count-prevCount, 1e-9)
		}
		prevLe, prevCount = bk.le, bk.count
	}
	return prevLe
}

// cpuTime is a process's user + system CPU time.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return time.Duration((utime + stime) / 100 * float64(time.Second)) // USER_HZ is 100 on Linux
}

// peakRSS is a process's peak resident set size in bytes.
func peakRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb * 1024
		}
	}
	return 0
}
