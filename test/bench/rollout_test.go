// Package bench measures the controller manager on a large simulated fleet: the real API server
// and the real manager binary, with the hosts' agents simulated in this process (no kubelet or
// thousands of systemd hosts can run here). Run it with `make bench`.
package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/stack"
	"github.com/go-logr/logr"
)

const metricsAddr = "127.0.0.1:18480"

// The fleet's size and the phases' lengths. The defaults are the goals' fleet; a larger one is
// asked for by GATEWAY_BENCH_HOSTS (e.g. 10000), shorter phases by GATEWAY_BENCH_IDLE.
var (
	hosts     = envInt("GATEWAY_BENCH_HOSTS", 1000)
	profiles  = envInt("GATEWAY_BENCH_PROFILES", 3)
	idle      = envDuration("GATEWAY_BENCH_IDLE", 10*time.Minute)
	quiet     = envDuration("GATEWAY_BENCH_QUIET", time.Minute)
	heartbeat = envDuration("GATEWAY_BENCH_HEARTBEAT", 10*time.Second)
	// profileDir, when set, receives the manager's CPU profile of the live rollout and its
	// heap at the end.
	profileDir = os.Getenv("GATEWAY_BENCH_PPROF_DIR")
)

// grace is the manager's heartbeat grace period, its default.
const grace = 40 * time.Second

// BenchmarkFleetRolloutSimulatedAgents rolls new releases over simulated hosts (1,000 × 3
// profiles by default) at maxUnavailable 10% and reports the manager's side of it: CPU time and
// reconcile time spent, peak RSS, API writes, and reconcile latency quantiles (interpolated from
// the manager's own histogram). Each phase runs twice in the same run, first with no live
// heartbeats (the baseline), then with every host heart-beating at the agent's interval: idle
// (no change at all) and a rollout.
func BenchmarkFleetRolloutSimulatedAgents(b *testing.B) {
	for n := 0; n < b.N; n++ {
		run(b)
	}
}

func run(b *testing.B) {
	// The simulators' caches log nothing worth reading.
	logf.SetLogger(logr.Discard())
	ctx := context.Background()
	bin := b.TempDir()
	if err := stack.Build(bin); err != nil {
		b.Fatal(err)
	}
	s, err := stack.Up(stack.Options{Dir: b.TempDir(), BinDir: bin, ManagerMetricsAddr: metricsAddr, HostGracePeriod: grace})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.Down() }()
	c := s.CP.Client
	procs := serverProcs()
	b.Logf("fleet: %d hosts × %d profiles; idle %s; heartbeat every %s; API server and etcd pids %v", hosts, profiles, idle, heartbeat, procs)

	// The fleet, registered as agents register: a GatewayHost with its status, and a Lease.
	// Each host's Lease is renewed once, an hour ahead, so that the baseline phases need no
	// live heartbeats to keep it reachable.
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	ahead := metav1.NewMicroTime(time.Now().Add(time.Hour))
	leases := make([]*coordinationv1.Lease, hosts)
	for i := 0; i < hosts; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			h := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: hostName(i)}}
			if err := c.Create(ctx, h); err != nil {
				b.Error(err)
				return
			}
			now := metav1.Now()
			h.Status.LastHeartbeatTime = &now
			h.Status.AgentVersion = "bench"
			if err := c.Status().Update(ctx, h); err != nil {
				b.Error(err)
			}
			id, secs := "bench-"+hostName(i), int32(4*heartbeat/time.Second)
			l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: v1.DefaultHostLeaseNamespace, Name: hostName(i)},
				Spec: coordinationv1.LeaseSpec{HolderIdentity: &id, LeaseDurationSeconds: &secs, AcquireTime: &ahead, RenewTime: &ahead}}
			if err := c.Create(ctx, l); err != nil {
				b.Error(err)
			}
			leases[i] = l
		}(i)
	}
	wg.Wait()
	for i, sha := range []string{strings.Repeat("1", 64), strings.Repeat("2", 64), strings.Repeat("3", 64)} {
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
	b.Logf("fleet in place; manager RSS %.0f MiB (peak %.0f MiB)", mib(rss(s.ManagerPID, "VmRSS:")), mib(rss(s.ManagerPID, "VmHWM:")))

	// Baselines: idle, then a rollout, with no live heartbeats.
	quietIdle := measureIdle(b, s, procs, nil, quiet)
	report(b, "idle-quiet", quietIdle)
	base := rollout(b, s, "r2", "2.0.0", "")
	report(b, "rollout-quiet", base)
	peakQuiet := rss(s.ManagerPID, "VmHWM:")

	// Live heartbeats. Their first round moves every Lease back from an hour ahead, which the
	// host controller rightly looks at once; the idle measure starts after it.
	beats := startHeartbeats(b, s, leases)
	defer beats.stop()
	time.Sleep(heartbeat + 2*time.Second)
	liveIdle := measureIdle(b, s, procs, beats, idle)
	report(b, "idle-live", liveIdle)
	beats0 := beats.ok.Load()
	live := rollout(b, s, "r3", "3.0.0", profileDir)
	live.beats = beats.ok.Load() - beats0
	report(b, "rollout-live", live)
	beats.stop()
	if profileDir != "" {
		saveProfile(b, "/debug/pprof/heap", filepath.Join(profileDir, "heap.pprof"))
	}

	b.ReportMetric(mib(peakQuiet), "peak-rss-quiet-MiB")
	b.ReportMetric(mib(rss(s.ManagerPID, "VmHWM:")), "peak-rss-MiB")
	b.ReportMetric(float64(beats.ok.Load()), "heartbeats")
	b.ReportMetric(float64(beats.statusWrites.Load()), "status-refreshes")
	b.ReportMetric(float64(beats.conflicts.Load()), "heartbeat-conflicts")
	b.ReportMetric(float64(beats.failed.Load()), "heartbeat-errors")
	b.ReportMetric(float64(agents.applied.Load()), "simulated-applies")
}

func hostName(i int) string { return fmt.Sprintf("host-%05d", i) }

// phase is what the manager did in one phase.
type phase struct {
	wall, cpu, serverCPU                         time.Duration
	writes, reconciles, hostReconciles, recTotal float64
	p50, p99                                     float64
	// perMinute is the manager's CPU in each whole minute of an idle phase.
	perMinute []time.Duration
	beats     int64
}

func report(b *testing.B, name string, p phase) {
	b.Helper()
	instances := float64(hosts * profiles)
	msg := fmt.Sprintf("%s: wall %s, manager CPU %s, API server+etcd CPU %s, writes %.0f (%.2f per instance), profile reconciles %.0f (%.1f s inside, p50 %.0f ms, p99 %.0f ms), host reconciles %.0f, heartbeats %d",
		name, p.wall.Round(100*time.Millisecond), p.cpu.Round(10*time.Millisecond), p.serverCPU.Round(10*time.Millisecond), p.writes, p.writes/instances,
		p.reconciles, p.recTotal, 1000*p.p50, 1000*p.p99, p.hostReconciles, p.beats)
	if len(p.perMinute) > 0 {
		var mins []string
		worst := time.Duration(0)
		for _, m := range p.perMinute {
			mins = append(mins, m.Round(10*time.Millisecond).String())
			worst = max(worst, m)
		}
		perMin := time.Duration(float64(p.cpu) / p.wall.Minutes())
		msg += fmt.Sprintf(", CPU per minute %s (%.2f%% of a core; worst minute %s), minutes: %s",
			perMin.Round(10*time.Millisecond), 100*perMin.Seconds()/60, worst.Round(10*time.Millisecond), strings.Join(mins, " "))
		b.ReportMetric(100*perMin.Seconds()/60, name+"-cpu-pct")
		b.ReportMetric(100*worst.Seconds()/60, name+"-worst-minute-cpu-pct")
	} else {
		b.ReportMetric(p.wall.Seconds(), name+"-wall-s")
		b.ReportMetric(p.cpu.Seconds(), name+"-cpu-s")
		b.ReportMetric(p.writes/instances, name+"-writes-per-instance")
	}
	b.ReportMetric(p.writes, name+"-writes")
	b.Log(msg)
}

// measureIdle watches the manager while nothing changes but, when beats run, the heartbeats.
func measureIdle(b *testing.B, s *stack.Stack, procs []int, beats *heartbeats, d time.Duration) phase {
	before := scrape(b)
	cpu0, srv0 := cpuTime(s.ManagerPID), cpuOf(procs)
	var beats0 int64
	if beats != nil {
		beats0 = beats.ok.Load()
	}
	if beats != nil && profileDir != "" {
		// A CPU profile of the first minute with live heartbeats.
		go saveProfile(b, "/debug/pprof/profile?seconds=60", filepath.Join(profileDir, "cpu-idle.pprof"))
	}
	start := time.Now()
	var p phase
	last := cpu0
	for time.Since(start)+time.Minute <= d {
		time.Sleep(time.Minute)
		now := cpuTime(s.ManagerPID)
		p.perMinute = append(p.perMinute, now-last)
		last = now
	}
	if rest := d - time.Since(start); rest > 0 {
		time.Sleep(rest)
	}
	p.wall = time.Since(start)
	p.cpu, p.serverCPU = cpuTime(s.ManagerPID)-cpu0, cpuOf(procs)-srv0
	if beats != nil {
		p.beats = beats.ok.Load() - beats0
	}
	p.fill(before, scrape(b))
	return p
}

// rollout moves every profile to a release and waits until all hosts run it.
func rollout(b *testing.B, s *stack.Stack, release, label, pprofDir string) phase {
	ctx := context.Background()
	c := s.CP.Client
	before := scrape(b)
	cpu0, srv0 := cpuTime(s.ManagerPID), cpuOf(serverProcs())
	var prof chan struct{}
	if pprofDir != "" {
		// A CPU profile of the rollout's first 30 seconds, the bulk of it.
		prof = make(chan struct{})
		go func() {
			defer close(prof)
			saveProfile(b, "/debug/pprof/profile?seconds=30", filepath.Join(pprofDir, "cpu-"+release+".pprof"))
		}()
	}
	start := time.Now()
	for i := 0; i < profiles; i++ {
		p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i)}}
		if err := c.Patch(ctx, p, client.RawPatch(types.MergePatchType, []byte(`{"spec":{"release":"`+release+`"}}`))); err != nil {
			b.Fatal(err)
		}
	}
	waitComplete(b, c, label)
	var p phase
	p.wall = time.Since(start)
	p.cpu, p.serverCPU = cpuTime(s.ManagerPID)-cpu0, cpuOf(serverProcs())-srv0
	p.fill(before, scrape(b))
	if prof != nil {
		<-prof
	}
	return p
}

// fill takes a phase's counts from the manager's metrics before and after it.
func (p *phase) fill(before, after metrics) {
	for _, m := range []string{"POST", "PUT", "PATCH", "DELETE"} {
		p.writes += after.get("rest_client_requests_total", "method", m) - before.get("rest_client_requests_total", "method", m)
	}
	p.recTotal = after.get("controller_runtime_reconcile_time_seconds_sum", "controller", "gatewayprofile") -
		before.get("controller_runtime_reconcile_time_seconds_sum", "controller", "gatewayprofile")
	p.reconciles = after.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayprofile") -
		before.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayprofile")
	p.hostReconciles = after.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayhost") -
		before.get("controller_runtime_reconcile_time_seconds_count", "controller", "gatewayhost")
	p.p50, p.p99 = after.quantile(before, 0.50), after.quantile(before, 0.99)
}

func waitComplete(b *testing.B, c client.Client, label string) {
	deadline := time.Now().Add(15 * time.Minute * time.Duration(max(1, hosts/1000)))
	for time.Now().Before(deadline) {
		var list v1.GatewayProfileList
		if err := c.List(context.Background(), &list); err == nil {
			done := 0
			for _, p := range list.Items {
				if r := p.Status.Rollout; r != nil && r.Phase == v1.RolloutComplete && r.To != nil && r.To.Label == label &&
					p.Status.Aligned == int32(hosts) {
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

// rss reads a size field of a process's /proc status (VmRSS:, VmHWM: for the peak) in bytes.
func rss(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			kb, _ := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

func mib(bytes int64) float64 { return float64(bytes) / (1 << 20) }

// serverProcs finds the kube-apiserver and etcd this process started, for their CPU time
// beside the manager's.
func serverProcs() []int {
	dirs, _ := os.ReadDir("/proc")
	var pids []int
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		st := string(b)
		comm := st[strings.IndexByte(st, '(')+1 : strings.LastIndexByte(st, ')')]
		f := strings.Fields(st[strings.LastIndexByte(st, ')')+2:])
		if ppid, _ := strconv.Atoi(f[1]); ppid == os.Getpid() && (comm == "kube-apiserver" || comm == "etcd") {
			pids = append(pids, pid)
		}
	}
	return pids
}

func cpuOf(pids []int) time.Duration {
	var sum time.Duration
	for _, pid := range pids {
		sum += cpuTime(pid)
	}
	return sum
}

// saveProfile fetches one of the manager's Go profiles into a file.
func saveProfile(b *testing.B, path, file string) {
	resp, err := http.Get("http://" + metricsAddr + path)
	if err != nil {
		b.Error(err)
		return
	}
	defer resp.Body.Close()
	out, err := os.Create(file)
	if err != nil {
		b.Error(err)
		return
	}
	defer out.Close()
	if _, err := io.Copy(out, resp.Body); err != nil {
		b.Error(err)
	}
}

// heartbeats renew every host's Lease as its agent does (nodeagent/agent/host.go): every
// interval, an update of renewTime from the copy last written, read again on a conflict. The
// hosts' renewals are spread evenly over the interval. Beside them, each host's status is
// written once every statusRefresh (the agent's default), a patch of lastHeartbeatTime from a
// cached copy, as the agent writes it when nothing in it changed for that long.
type heartbeats struct {
	ok, conflicts, failed, statusWrites atomic.Int64
	cancel                              context.CancelFunc
	wg                                  sync.WaitGroup
	once                                sync.Once
}

// statusRefresh is the agent's default (agent.DefaultStatusRefresh).
const statusRefresh = 5 * time.Minute

func startHeartbeats(b *testing.B, s *stack.Stack, leases []*coordinationv1.Lease) *heartbeats {
	hc, err := cache.New(s.CP.Config, cache.Options{Scheme: s.CP.Scheme})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := hc.GetInformer(context.Background(), &v1.GatewayHost{}); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	hb := &heartbeats{cancel: cancel}
	go func() { _ = hc.Start(ctx) }()
	if !hc.WaitForCacheSync(ctx) {
		b.Fatal("host cache did not sync")
	}
	c := s.CP.Client
	// A host's Lease is renewed by one worker at a time: its index picks the worker.
	const workers = 32
	var work [workers]chan int
	for w := range workers {
		work[w] = make(chan int, 64)
		hb.wg.Add(1)
		go func() {
			defer hb.wg.Done()
			for i := range work[w] {
				if i < 0 {
					hb.refreshStatus(ctx, hc, c, hostName(-i-1))
				} else {
					leases[i] = hb.renew(ctx, c, leases[i])
				}
			}
		}()
	}
	// every sends host i to its worker every period, the hosts spread evenly over it; a
	// negative index asks for a status write.
	every := func(period time.Duration, status bool) {
		defer hb.wg.Done()
		start := time.Now()
		for n := 0; ; n++ {
			at := start.Add(time.Duration(n) * period / time.Duration(hosts))
			t := time.NewTimer(time.Until(at))
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			i := n % hosts
			job := i
			if status {
				job = -i - 1
			}
			select {
			case work[i%workers] <- job:
			case <-ctx.Done():
				return
			}
		}
	}
	var senders sync.WaitGroup
	senders.Add(2)
	hb.wg.Add(3)
	go func() { defer senders.Done(); every(heartbeat, false) }()
	go func() { defer senders.Done(); every(statusRefresh, true) }()
	go func() {
		defer hb.wg.Done()
		senders.Wait()
		for w := range work {
			close(work[w])
		}
	}()
	return hb
}

// renew renews one Lease from its last written copy and returns the copy to use next.
func (hb *heartbeats) renew(ctx context.Context, c client.Client, l *coordinationv1.Lease) *coordinationv1.Lease {
	for try := 0; try < 5; try++ {
		next := l.DeepCopy()
		now := metav1.NewMicroTime(time.Now())
		next.Spec.RenewTime = &now
		err := c.Update(ctx, next)
		switch {
		case err == nil:
			hb.ok.Add(1)
			return next
		case apierrors.IsConflict(err):
			hb.conflicts.Add(1)
			var fresh coordinationv1.Lease
			if err := c.Get(ctx, client.ObjectKeyFromObject(l), &fresh); err != nil {
				hb.failed.Add(1)
				return l
			}
			l = &fresh
		default:
			if ctx.Err() == nil {
				hb.failed.Add(1)
			}
			return l
		}
	}
	hb.failed.Add(1)
	return l
}

// refreshStatus writes a host's status as its agent does every statusRefresh.
func (hb *heartbeats) refreshStatus(ctx context.Context, r client.Reader, c client.Client, name string) {
	var h v1.GatewayHost
	if err := r.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
		hb.failed.Add(1)
		return
	}
	for try := 0; try < 5; try++ {
		base := h.DeepCopy()
		now := metav1.Now()
		h.Status.LastHeartbeatTime = &now
		err := c.Status().Patch(ctx, &h, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}))
		switch {
		case err == nil:
			hb.statusWrites.Add(1)
			return
		case apierrors.IsConflict(err):
			if err := c.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
				hb.failed.Add(1)
				return
			}
		default:
			if ctx.Err() == nil {
				hb.failed.Add(1)
			}
			return
		}
	}
	hb.failed.Add(1)
}

func (hb *heartbeats) stop() { hb.once.Do(func() { hb.cancel(); hb.wg.Wait() }) }

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
