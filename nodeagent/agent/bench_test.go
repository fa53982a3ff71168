package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// benchAgentEnv, when set, makes the test binary run one node agent in its own process (for the
// benchmark, which measures that process) instead of the tests; the value is a benchAgent in JSON.
const benchAgentEnv = "GATEWAY_BENCH_AGENT"

type benchAgent struct {
	Kubeconfig, Counts                             string
	HostName, Root, BusAddress, ProcRoot, Launcher string
	ReproveInterval                                time.Duration
}

// runBenchAgent runs the agent until SIGTERM, counting its API requests by verb and resource;
// on SIGUSR1 it writes the counts to the Counts file.
func runBenchAgent(spec string) int {
	var ba benchAgent
	if err := json.Unmarshal([]byte(spec), &ba); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", ba.Kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	counts := &requestCounts{n: map[string]int{}}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{rt, counts} })
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		for range usr1 {
			b, _ := json.Marshal(counts.snapshot())
			_ = renameio.WriteFile(ba.Counts, b, 0o600)
		}
	}()
	o := agent.Options{
		HostName: ba.HostName, Root: ba.Root, BusAddress: ba.BusAddress, ProcRoot: ba.ProcRoot, Launcher: ba.Launcher,
		HeartbeatInterval: 10 * time.Second, ProofTimeout: 20 * time.Second, ReproveInterval: ba.ReproveInterval,
		MetricsAddr: "0", ProbeAddr: "0", Version: "bench",
	}
	if err := agent.Run(ctx, cfg, o, logr.Discard()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

type requestCounts struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *requestCounts) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]int, len(c.n))
	for k, v := range c.n {
		m[k] = v
	}
	return m
}

type countingTransport struct {
	rt     http.RoundTripper
	counts *requestCounts
}

func (t countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.counts.mu.Lock()
	t.counts.n[requestVerb(req)]++
	t.counts.mu.Unlock()
	return t.rt.RoundTrip(req)
}

// requestVerb names a request as the API server's audit would: "watch gatewayinstances",
// "patch gatewayhosts/status".
func requestVerb(req *http.Request) string {
	seg := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	switch {
	case len(seg) > 0 && seg[0] == "api":
		seg = seg[min(2, len(seg)):]
	case len(seg) > 0 && seg[0] == "apis":
		seg = seg[min(3, len(seg)):]
	}
	if len(seg) >= 2 && seg[0] == "namespaces" && len(seg) > 2 {
		seg = seg[2:]
	}
	resource, named := "", len(seg) > 1
	if len(seg) > 0 {
		resource = seg[0]
	}
	if len(seg) > 2 {
		resource += "/" + seg[2]
	}
	verb := strings.ToLower(req.Method)
	switch req.Method {
	case http.MethodGet:
		switch {
		case req.URL.Query().Get("watch") == "true" || req.URL.Query().Get("watch") == "1":
			verb = "watch"
		case named:
			verb = "get"
		default:
			verb = "list"
		}
	case http.MethodPost:
		verb = "create"
	case http.MethodPut:
		verb = "update"
	}
	return verb + " " + resource
}

// BenchmarkDriftDetection runs one node agent in its own process for a real systemd host with 10
// profiles. It measures the idle agent over GATEWAY_BENCH_IDLE (default 5m): resident memory,
// CPU time and API requests by verb; then, GATEWAY_BENCH_DRIFT_N times (default 10) for each kind
// of drift, the time from the change on disk or in systemd to the Drifted condition written on
// the API server (seen through a watch), waiting for each heal before the next change.
func BenchmarkDriftDetection(b *testing.B) {
	idle := envDuration(b, "GATEWAY_BENCH_IDLE", 5*time.Minute)
	n := 10
	if v := os.Getenv("GATEWAY_BENCH_DRIFT_N"); v != "" {
		if _, err := fmt.Sscan(v, &n); err != nil || n < 1 {
			b.Fatalf("GATEWAY_BENCH_DRIFT_N=%q", v)
		}
	}
	ctx := context.Background()
	const host = "drift-bench"
	h := systemdhost.Start(b, systemdhost.Options{Name: host})
	dir := b.TempDir()
	kubeconfig, err := cp.Kubeconfig(dir, "drift-bench-agent", "system:masters")
	if err != nil {
		b.Fatal(err)
	}
	counts := filepath.Join(dir, "counts.json")
	spec, err := json.Marshal(benchAgent{Kubeconfig: kubeconfig, Counts: counts,
		HostName: host, Root: h.Root, BusAddress: h.BusAddress, ProcRoot: fmt.Sprintf("/proc/%d/root/proc", h.PID),
		Launcher: launchBin,
		// Longer than the idle window: the backstop adds one full proof per profile per interval.
		ReproveInterval: 2 * idle,
	})
	if err != nil {
		b.Fatal(err)
	}
	logFile, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$") //nolint:gosec // the test binary itself
	cmd.Env = append(os.Environ(), benchAgentEnv+"="+string(spec))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	pid := cmd.Process.Pid

	srv := agentruntime.Serve(b)
	r1 := agentruntime.MustBuild(b, agentruntime.Options{Version: "1.0.0"})
	r2 := agentruntime.MustBuild(b, agentruntime.Options{Version: "2.0.0"})
	u1, u2 := srv.Add("r1.tar.gz", r1.Data), srv.Add("r2.tar.gz", r2.Data)
	var profiles []string
	for i := range 10 {
		p := fmt.Sprintf("p%d", i)
		profiles = append(profiles, p)
		gi := newInstance(p, host, r1, u1)
		if i == 9 {
			gi = newInstance(p, host, r2, u2) // a second release on disk, for flipping p0's current to
		}
		if err := cp.Client.Create(ctx, gi); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			// Let it go without the agent, which is stopped by then.
			var cur v1.GatewayInstance
			if err := cp.Client.Get(ctx, client.ObjectKeyFromObject(gi), &cur); err == nil {
				base := cur.DeepCopy()
				cur.Finalizers = nil
				_ = cp.Client.Patch(ctx, &cur, client.MergeFrom(base))
				_ = cp.Client.Delete(ctx, &cur)
			}
		})
	}
	for _, p := range profiles {
		pollUntil(b, p+" aligned", 3*time.Minute, func() bool {
			var gi v1.GatewayInstance
			err := cp.Client.Get(ctx, client.ObjectKey{Name: v1.InstanceName(p, host)}, &gi)
			return err == nil && meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned)
		})
	}

	// Idle: nothing changes on the host or in the API.
	time.Sleep(15 * time.Second)
	before := snapshotCounts(b, pid, counts)
	cpu0 := cpuTime(pid)
	time.Sleep(idle)
	cpu := cpuTime(pid) - cpu0
	after := snapshotCounts(b, pid, counts)
	rssNow, rssPeak := rss(pid, "VmRSS:"), rss(pid, "VmHWM:")
	// Anonymous pages are the agent's own (heap, stacks); file pages are the binary's code and
	// data as far as it was touched, which the test binary has more of than the agent's binary.
	rssAnon, rssFile := rss(pid, "RssAnon:"), rss(pid, "RssFile:")
	var reqs []string
	total := 0
	for k, v := range after {
		if d := v - before[k]; d > 0 {
			reqs = append(reqs, fmt.Sprintf("%s: %d", k, d))
			total += d
		}
	}
	sort.Strings(reqs)

	// Detection latency by kind.
	lat := measureDrift(b, h, host, n)

	// go test keeps only the first ten lines a benchmark logs.
	b.Logf("idle agent, 10 profiles, %s: RSS %.1f MiB (anonymous %.1f, file %.1f; peak over the run %.1f MiB; goal <= 30 MiB), CPU %.2f s = %.3f %% of a core (goal <= 0.1 %%)",
		idle, mib(rssNow), mib(rssAnon), mib(rssFile), mib(rssPeak), cpu.Seconds(), 100*cpu.Seconds()/idle.Seconds())
	b.Logf("idle API requests %d (goal: only watches and the heartbeat): %s", total, strings.Join(reqs, ", "))
	b.Logf("detection latency, change -> Drifted written, %d changes per kind (goal p95 <= 2 s):", n)
	for _, k := range driftKinds {
		p50, p95 := percentile(lat[k.name], 50), percentile(lat[k.name], 95)
		b.Logf("  %-9s p50 %6.0f ms   p95 %6.0f ms", k.name, ms(p50), ms(p95))
		b.ReportMetric(ms(p95), k.name+"-p95-ms")
	}
	b.ReportMetric(mib(rssNow), "idle-RSS-MiB")
	b.ReportMetric(100*cpu.Seconds()/idle.Seconds(), "idle-CPU-%")
	b.ReportMetric(float64(total), "idle-API-requests")
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func envDuration(b *testing.B, name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	return d
}

func pollUntil(b *testing.B, what string, limit time.Duration, ok func() bool) {
	b.Helper()
	deadline := time.Now().Add(limit)
	for !ok() {
		if time.Now().After(deadline) {
			b.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// snapshotCounts asks the agent process for its request counts and reads them.
func snapshotCounts(b *testing.B, pid int, file string) map[string]int {
	b.Helper()
	_ = os.Remove(file)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		b.Fatal(err)
	}
	var m map[string]int
	pollUntil(b, "request counts", 10*time.Second, func() bool {
		data, err := os.ReadFile(file) //nolint:gosec // the benchmark's own file
		return err == nil && json.Unmarshal(data, &m) == nil
	})
	return m
}

// driftKind is one kind of change the benchmark makes to profile p0 (or, for the template, to
// every profile).
type driftKind struct {
	name    string
	change  func(b *testing.B, h *systemdhost.Host)
	anyone  bool // the change concerns every profile: whichever reports it first counts
	process bool // systemd restarts the process: healed means re-proven
}

var driftKinds = []driftKind{
	{name: "env", change: func(b *testing.B, h *systemdhost.Host) {
		appendTo(b, filepath.Join(h.Root, "opt/agent/gateways/p0/env"), "X=1\n")
	}},
	{name: "current", change: func(b *testing.B, h *systemdhost.Host) {
		other, err := os.Readlink(filepath.Join(h.Root, "opt/agent/gateways/p9/current"))
		if err != nil {
			b.Fatal(err)
		}
		if err := renameio.Symlink(other, filepath.Join(h.Root, "opt/agent/gateways/p0/current")); err != nil {
			b.Fatal(err)
		}
	}},
	{name: "dropin", change: func(b *testing.B, h *systemdhost.Host) {
		f := filepath.Join(h.Root, "etc/systemd/system/agent-gateway@p0.service.d/90-stray.conf")
		if err := os.WriteFile(f, []byte("[Service]\nEnvironment=PYTHONPATH=/tmp\n"), 0o644); err != nil { //nolint:gosec // a unit file
			b.Fatal(err)
		}
	}},
	{name: "template", anyone: true, change: func(b *testing.B, h *systemdhost.Host) {
		appendTo(b, filepath.Join(h.Root, "etc/systemd/system/agent-gateway@.service"), "# by hand\n")
	}},
	{name: "kill", process: true, change: func(b *testing.B, h *systemdhost.Host) {
		var gi v1.GatewayInstance
		if err := cp.Client.Get(context.Background(), client.ObjectKey{Name: v1.InstanceName("p0", h.Name)}, &gi); err != nil {
			b.Fatal(err)
		}
		if out, err := h.Exec(context.Background(), "kill", "-KILL", fmt.Sprint(gi.Status.MainPID)); err != nil {
			b.Fatalf("kill: %v %s", err, out)
		}
	}},
	{name: "stop", change: func(b *testing.B, h *systemdhost.Host) {
		if out, err := h.Systemctl(context.Background(), "stop", "--no-block", "agent-gateway@p0.service"); err != nil {
			b.Fatalf("stop: %v %s", err, out)
		}
	}},
}

func appendTo(b *testing.B, file, text string) {
	f, err := os.OpenFile(file, os.O_APPEND|os.O_WRONLY, 0) //nolint:gosec // a file of the test host
	if err != nil {
		b.Fatal(err)
	}
	if _, err := f.WriteString(text); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
}

// measureDrift makes each kind of change n times and returns the detection latencies by kind.
func measureDrift(b *testing.B, h *systemdhost.Host, host string, n int) map[string][]time.Duration {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctrllog.SetLogger(logr.Discard())
	wc, err := client.NewWithWatch(cp.Config, client.Options{Scheme: agent.Scheme()})
	if err != nil {
		b.Fatal(err)
	}
	w, err := wc.Watch(ctx, &v1.GatewayInstanceList{}, client.MatchingLabels{v1.LabelHost: host})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Stop()
	type seen struct {
		at time.Time
		gi *v1.GatewayInstance
	}
	events := make(chan seen, 1024)
	go func() {
		for ev := range w.ResultChan() {
			if gi, ok := ev.Object.(*v1.GatewayInstance); ok {
				events <- seen{time.Now(), gi}
			}
		}
	}()
	drifted := map[string]metav1.Condition{} // last Drifted condition seen per instance
	p0 := v1.InstanceName("p0", host)
	// wait reads events until ok holds for one; it returns that event's time.
	wait := func(what string, ok func(gi *v1.GatewayInstance, c *metav1.Condition, last metav1.Condition) bool) time.Time {
		timeout := time.After(2 * time.Minute)
		for {
			select {
			case s := <-events:
				c := meta.FindStatusCondition(s.gi.Status.Conditions, v1.ConditionDrifted)
				last := drifted[s.gi.Name]
				if c != nil {
					drifted[s.gi.Name] = *c
				}
				if c != nil && ok(s.gi, c, last) {
					return s.at
				}
			case <-timeout:
				b.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	lat := map[string][]time.Duration{}
	for _, k := range driftKinds {
		for range n {
			t0 := time.Now()
			k.change(b, h)
			seenAt := wait(k.name+" reported", func(gi *v1.GatewayInstance, c *metav1.Condition, last metav1.Condition) bool {
				return (k.anyone || gi.Name == p0) && c.Status == metav1.ConditionTrue && c.Message != last.Message
			})
			lat[k.name] = append(lat[k.name], seenAt.Sub(t0))
			wait(k.name+" healed", func(gi *v1.GatewayInstance, c *metav1.Condition, _ metav1.Condition) bool {
				return (k.anyone || gi.Name == p0) && c.Status == metav1.ConditionFalse &&
					meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionReady)
			})
			time.Sleep(200 * time.Millisecond) // let the heal's own echoes settle
		}
	}
	return lat
}

func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[max((len(s)*p+99)/100-1, 0)]
}

// cpuTime is a process's user + system CPU time.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	var utime, stime float64
	_, _ = fmt.Sscan(f[11], &utime)
	_, _ = fmt.Sscan(f[12], &stime)
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
			var kb int64
			_, _ = fmt.Sscan(strings.Fields(rest)[0], &kb)
			return kb * 1024
		}
	}
	return 0
}

func mib(bytes int64) float64 { return float64(bytes) / (1 << 20) }
