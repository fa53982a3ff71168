package agent_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/repo"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

var (
	cp        *controlplane.Env
	launchBin string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

// leaseNS holds the hosts' heartbeat Leases, as in a real install.
const leaseNS = v1.DefaultHostLeaseNamespace

func run(m *testing.M) int {
	if spec := os.Getenv(benchAgentEnv); spec != "" {
		return runBenchAgent(spec)
	}
	bins, cleanup, err := repo.BuildTemp("gateway-launch")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cleanup()
	launchBin = bins[0]
	cp, err = controlplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = cp.Stop() }()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: leaseNS}}
	if err := cp.Client.Create(context.Background(), ns); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return systemdhost.RunWithLeakCheck(m)
}

// startAgent runs a node agent for a real systemd host against the real API server.
func startAgent(t *testing.T, name string, opts ...func(*agent.Options)) *systemdhost.Host {
	h := systemdhost.Start(t, systemdhost.Options{Name: name})
	stop := runAgent(t, h, name, opts...)
	t.Cleanup(stop)
	return h
}

// runAgent runs a node agent for a booted host until the returned function is called.
func runAgent(t *testing.T, h *systemdhost.Host, name string, opts ...func(*agent.Options)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	o := agent.Options{
		HostName: name, HostLabels: map[string]string{v1.LabelReportedPrefix + "rack": "r1"},
		Root: h.Root, BusAddress: h.BusAddress, ProcRoot: fmt.Sprintf("/proc/%d/root/proc", h.PID),
		Launcher: launchBin, HeartbeatInterval: 500 * time.Millisecond, LeaseNamespace: leaseNS, ProofTimeout: 20 * time.Second,
		MetricsAddr: "0", ProbeAddr: "0", Version: "test",
	}
	for _, f := range opts {
		f(&o)
	}
	go func() {
		done <- agent.Run(ctx, cp.Config, o, testr.New(t))
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("agent %s: %v", name, err)
			}
		})
	}
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	poll.Until(t, what, 60*time.Second, cond)
}

func newInstance(profile, host string, tb *agentruntime.Tarball, url string) *v1.GatewayInstance {
	return &v1.GatewayInstance{
		ObjectMeta: metav1.ObjectMeta{
			Name:       v1.InstanceName(profile, host),
			Labels:     map[string]string{v1.LabelHost: host, v1.LabelProfile: profile},
			Finalizers: []string{v1.FinalizerInstanceUnits},
		},
		Spec: v1.GatewayInstanceSpec{
			Profile: profile, Host: host,
			Release: v1.ReleaseArtifact{Name: "agent-" + tb.Label, URL: url, SHA256: tb.SHA256, Label: tb.Label},
		},
	}
}

func condition(gi *v1.GatewayInstance, t string) *metav1.Condition {
	return meta.FindStatusCondition(gi.Status.Conditions, t)
}

// TestAgentAppliesItsOwnInstances runs the agent against the real API server and a real
// systemd host: it registers its host, applies its instance, reports the proof, follows a
// release change, ignores another host's instance, and removes the unit on deletion.
func TestAgentAppliesItsOwnInstances(t *testing.T) {
	ctx := context.Background()
	c := cp.Client
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	r2 := agentruntime.MustBuild(t, agentruntime.Options{Version: "2.0.0"})
	u1, u2 := srv.Add("r1.tar.gz", r1.Data), srv.Add("r2.tar.gz", r2.Data)

	h := startAgent(t, "node-a")

	var gh v1.GatewayHost
	eventually(t, "the host to register", func() (bool, string) {
		if err := c.Get(ctx, client.ObjectKey{Name: "node-a"}, &gh); err != nil {
			return false, err.Error()
		}
		return gh.Status.LastHeartbeatTime != nil && meta.IsStatusConditionTrue(gh.Status.Conditions, v1.ConditionReady), fmt.Sprintf("%+v", gh.Status)
	})
	if gh.Labels[v1.LabelReportedPrefix+"rack"] != "r1" || gh.Labels[v1.LabelReportedArch] == "" || !strings.HasPrefix(gh.Status.SystemdVersion, "252") {
		t.Errorf("registered host: labels %v systemd %q", gh.Labels, gh.Status.SystemdVersion)
	}
	if c := gh.Status.Capabilities; c.MicroVM || c.Kata {
		t.Errorf("an agent without a microVM guest on a host without Kata reports %+v", c)
	}
	first := leaseOf(t, "node-a").Spec.RenewTime.Time
	eventually(t, "a second heartbeat", func() (bool, string) {
		return leaseOf(t, "node-a").Spec.RenewTime.After(first), ""
	})

	gi := newInstance("core", "node-a", r1, u1)
	mem := resource.MustParse("256Mi")
	gi.Spec.Resources = v1.GatewayResources{MemoryMax: &mem, TasksMax: 64}
	other := newInstance("core", "node-b", r1, u1)
	for _, o := range []*v1.GatewayInstance{gi, other} {
		if err := c.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	waitAligned := func(label string) *v1.GatewayInstance {
		var got v1.GatewayInstance
		eventually(t, "core to be aligned on "+label, func() (bool, string) {
			if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got); err != nil {
				return false, err.Error()
			}
			a := condition(&got, v1.ConditionAligned)
			return a != nil && a.Status == metav1.ConditionTrue && got.Status.ObservedGeneration == got.Generation &&
				got.Status.CurrentRelease != nil && got.Status.CurrentRelease.Label == label, fmt.Sprintf("%+v", got.Status)
		})
		return &got
	}
	got := waitAligned("1.0.0")
	if got.Status.MainPID == 0 || got.Status.Alignment == nil || got.Status.Alignment.PythonPath != "/opt/agent/gateways/core/current" {
		t.Errorf("status lacks the proof: %+v", got.Status)
	}
	if iso := condition(got, v1.ConditionIsolated); iso == nil || iso.Status != metav1.ConditionTrue {
		t.Errorf("Isolated condition: %+v", iso)
	}
	firstPID := got.Status.MainPID
	// The instance's resource caps reach the unit.
	dropIn, err := os.ReadFile(filepath.Join(h.Root, "etc/systemd/system/agent-gateway@core.service.d/50-gateway-operator.conf"))
	if err != nil || !strings.Contains(string(dropIn), "\nMemoryMax=268435456\n") || !strings.Contains(string(dropIn), "\nTasksMax=64\n") {
		t.Errorf("core's drop-in lacks the instance's caps (%v):\n%s", err, dropIn)
	}

	base := got.DeepCopy()
	got.Spec.Release = v1.ReleaseArtifact{Name: "agent-2.0.0", URL: u2, SHA256: r2.SHA256, Label: r2.Label}
	// Condition times have a resolution of a second: let one pass since the first proof.
	firstAligned := condition(got, v1.ConditionAligned).LastTransitionTime
	time.Sleep(time.Until(firstAligned.Add(1100 * time.Millisecond)))
	if err := c.Patch(ctx, got, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	got = waitAligned("2.0.0")
	if got.Status.MainPID == firstPID {
		t.Error("the release changed but the main PID did not")
	}
	// Aligned on the new release since its proof: the rollout's minReadySeconds counts from it.
	if a := condition(got, v1.ConditionAligned); !a.LastTransitionTime.After(firstAligned.Time) {
		t.Errorf("Aligned on 2.0.0 since %s, the time of the proof of 1.0.0", a.LastTransitionTime)
	}

	// The other host's instance is never touched by this agent.
	var o v1.GatewayInstance
	if err := c.Get(ctx, client.ObjectKeyFromObject(other), &o); err != nil {
		t.Fatal(err)
	}
	if len(o.Status.Conditions) != 0 {
		t.Errorf("node-a's agent wrote node-b's instance status: %+v", o.Status)
	}

	var evs eventsv1.EventList
	eventually(t, "a Restarted event", func() (bool, string) {
		_ = c.List(ctx, &evs)
		for _, e := range evs.Items {
			if e.Regarding.Name == gi.Name && e.Reason == "Restarted" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events", len(evs.Items))
	})

	if err := c.Delete(ctx, got); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the instance to be gone", func() (bool, string) {
		err := c.Get(ctx, client.ObjectKeyFromObject(gi), &o)
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	if _, err := os.Lstat(filepath.Join(h.Root, "opt/agent/gateways/core/current")); err == nil {
		t.Error("core's current link survived deletion")
	}
	out, _ := h.Systemctl(ctx, "is-active", "agent-gateway@core.service")
	if s := strings.TrimSpace(string(out)); s == "active" {
		t.Error("core still runs after its instance was deleted")
	}
	// node-b's instance keeps its finalizer: only node-b's agent may remove it.
	base = o.DeepCopy()
	o.Finalizers = nil
	_ = c.Patch(ctx, &o, client.MergeFrom(base))
	_ = c.Delete(ctx, &o)
}

// TestAgentReportsBadReleaseAndKeepsServing: a wrong sha256 gets a Degraded condition naming
// the reason, and the running release keeps serving.
func TestAgentReportsBadReleaseAndKeepsServing(t *testing.T) {
	ctx := context.Background()
	c := cp.Client
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	u1 := srv.Add("r1.tar.gz", r1.Data)
	h := startAgent(t, "node-c")

	gi := newInstance("api", "node-c", r1, u1)
	if err := c.Create(ctx, gi); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Delete(ctx, gi)
	})
	var got v1.GatewayInstance
	eventually(t, "api to be aligned", func() (bool, string) {
		_ = c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
		return meta.IsStatusConditionTrue(got.Status.Conditions, v1.ConditionAligned), fmt.Sprintf("%+v", got.Status.Conditions)
	})
	pid := got.Status.MainPID
	base := got.DeepCopy()
	got.Spec.Release.SHA256 = strings.Repeat("0", 64)
	got.Spec.Release.Label = "1.0.1"
	if err := c.Patch(ctx, &got, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a Degraded condition", func() (bool, string) {
		_ = c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
		d := condition(&got, v1.ConditionDegraded)
		return d != nil && d.Status == metav1.ConditionTrue && d.Reason == "DigestMismatch" && got.Status.ObservedGeneration == got.Generation,
			fmt.Sprintf("%+v", got.Status.Conditions)
	})
	if got.Status.CurrentRelease == nil || got.Status.CurrentRelease.Label != "1.0.0" || got.Status.MainPID != pid {
		t.Errorf("after a refused release: current %+v pid %d (was %d)", got.Status.CurrentRelease, got.Status.MainPID, pid)
	}
	st, err := agentruntime.GetStatus(ctx, filepath.Join(h.Root, "opt/agent/gateways/api/home/run/status.sock"))
	if err != nil || st.Version != "1.0.0" || uint32(st.PID) != uint32(pid) {
		t.Errorf("api after a refused release: %+v, %v", st, err)
	}
	if s := condition(&got, v1.ConditionStalled); s == nil || s.Status != metav1.ConditionTrue || s.Reason != "DigestMismatch" {
		t.Errorf("a failed apply is not Stalled: %+v", s)
	}

	// A retry request: the agent applies again and says which request its status answers.
	base = got.DeepCopy()
	got.Annotations = map[string]string{v1.AnnotationRetry: "retry-1"}
	if err := c.Patch(ctx, &got, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the retry answered", func() (bool, string) {
		_ = c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
		return got.Status.LastHandledRetry == "retry-1", "last handled retry " + got.Status.LastHandledRetry
	})

	// The good release again: no longer Stalled.
	base = got.DeepCopy()
	got.Spec.Release = gi.Spec.Release
	if err := c.Patch(ctx, &got, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "aligned again, not Stalled", func() (bool, string) {
		_ = c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
		return got.Status.ObservedGeneration == got.Generation && meta.IsStatusConditionTrue(got.Status.Conditions, v1.ConditionAligned) &&
			condition(&got, v1.ConditionStalled) == nil, fmt.Sprintf("%+v", got.Status.Conditions)
	})
}

// laggingCache reads like an informer cache that has not seen an object this client created
// less than a second ago.
type laggingCache struct {
	client.Client
	created map[string]time.Time
}

func (c *laggingCache) Create(ctx context.Context, obj client.Object, opts ...client.CreateOption) error {
	err := c.Client.Create(ctx, obj, opts...)
	if err == nil {
		c.created[obj.GetName()] = time.Now()
	}
	return err
}

func (c *laggingCache) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	if at, ok := c.created[key.Name]; ok && time.Since(at) < time.Second {
		return apierrors.NewNotFound(v1.GroupVersion.WithResource("gatewayhosts").GroupResource(), key.Name)
	}
	return c.Client.Get(ctx, key, obj, opts...)
}

// leaseOf reads a host's heartbeat Lease.
func leaseOf(t *testing.T, host string) *coordinationv1.Lease {
	t.Helper()
	var l coordinationv1.Lease
	if err := cp.Client.Get(context.Background(), client.ObjectKey{Namespace: leaseNS, Name: host}, &l); err != nil {
		t.Fatal(err)
	}
	return &l
}

// TestHeartbeatRenewsLeaseStatusOnChange: the agent heart-beats by renewing its host's Lease,
// held under its ID, and leaves the GatewayHost alone while nothing in its status changes: the
// manager then receives a small Lease renewal per beat, not the whole GatewayHost. A change
// (here the host's generation, which the status reports as observed) is written at the next
// beat.
func TestHeartbeatRenewsLeaseStatusOnChange(t *testing.T) {
	ctx := context.Background()
	sd := beatingHost(t, "lease-beat")
	t.Cleanup(func() {
		_ = cp.Client.Delete(context.Background(), &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: "lease-beat"}})
	})
	runBeat(t, &agent.Heartbeat{Client: cp.Client, APIReader: cp.Client, Host: "lease-beat", Systemd: sd,
		Interval: 300 * time.Millisecond, LeaseNamespace: leaseNS, StatusRefresh: time.Hour, ID: "agent-lease"})
	var gh v1.GatewayHost
	eventually(t, "the host registered and reported", func() (bool, string) {
		if err := cp.Client.Get(ctx, client.ObjectKey{Name: "lease-beat"}, &gh); err != nil {
			return false, err.Error()
		}
		return gh.Status.LastHeartbeatTime != nil && gh.Status.AgentID == "agent-lease", fmt.Sprintf("%+v", gh.Status)
	})
	first := leaseOf(t, "lease-beat")
	if h := first.Spec.HolderIdentity; h == nil || *h != "agent-lease" || first.Spec.RenewTime == nil {
		t.Fatalf("Lease %+v; want it held by agent-lease and renewed", first.Spec)
	}
	renewals := 0
	eventually(t, "five renewals", func() (bool, string) {
		l := leaseOf(t, "lease-beat")
		if l.ResourceVersion != first.ResourceVersion {
			renewals++
			first = l
		}
		return renewals >= 5, fmt.Sprintf("%d renewals", renewals)
	})
	var now v1.GatewayHost
	if err := cp.Client.Get(ctx, client.ObjectKey{Name: "lease-beat"}, &now); err != nil {
		t.Fatal(err)
	}
	if now.ResourceVersion != gh.ResourceVersion {
		t.Errorf("the GatewayHost was written while nothing in its status changed: %+v, then %+v", gh.Status, now.Status)
	}
	if err := cp.Client.Patch(ctx, &now, client.RawPatch(types.MergePatchType, []byte(`{"spec":{"unschedulable":true}}`))); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new generation reported", func() (bool, string) {
		if err := cp.Client.Get(ctx, client.ObjectKey{Name: "lease-beat"}, &now); err != nil {
			return false, err.Error()
		}
		return now.Status.ObservedGeneration == now.Generation, fmt.Sprintf("observed %d of %d", now.Status.ObservedGeneration, now.Generation)
	})
}

// An agent whose Lease cannot be renewed (here its namespace does not exist; in an install
// whose RBAC predates Leases, it is forbidden) heart-beats in the GatewayHost's status on every
// beat instead, so its host stays reachable.
func TestHeartbeatFallsBackToStatusWithoutLease(t *testing.T) {
	sd := beatingHost(t, "no-lease")
	runBeat(t, &agent.Heartbeat{Client: cp.Client, APIReader: cp.Client, Host: "no-lease", Systemd: sd,
		Interval: 300 * time.Millisecond, LeaseNamespace: "no-such-namespace", StatusRefresh: time.Hour})
	var first *metav1.Time
	eventually(t, "status heartbeats", func() (bool, string) {
		var gh v1.GatewayHost
		if err := cp.Client.Get(context.Background(), client.ObjectKey{Name: "no-lease"}, &gh); err != nil {
			return false, err.Error()
		}
		hb := gh.Status.LastHeartbeatTime
		if hb != nil && first == nil {
			first = hb
		}
		// Heartbeat times have a resolution of a second: two seconds later is two more beats.
		return hb != nil && hb.Sub(first.Time) >= 2*time.Second, fmt.Sprintf("first %v, last %v", first, hb)
	})
}

// beatingHost boots a systemd host for heartbeat tests and dials its systemd; the GatewayHost
// they register is deleted when the test ends.
func beatingHost(t *testing.T, name string) *systemd.Conn {
	t.Helper()
	h := systemdhost.Start(t, systemdhost.Options{Name: name})
	sd, err := systemd.Dial(context.Background(), h.BusAddress)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sd.Close()
		_ = cp.Client.Delete(context.Background(), &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: name}})
	})
	return sd
}

// runBeat runs a heartbeat until the returned function is called (or the test ends).
func runBeat(t *testing.T, beat *agent.Heartbeat) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- beat.Start(logr.NewContext(ctx, testr.New(t))) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// The first heartbeat registers the host and lands at once, even when the agent reads through
// a cache that has not seen the new GatewayHost yet: with an interval of an hour, a first beat
// that failed would leave the host unreachable (and moved by any rollout as a host that serves
// nothing) for that hour.
func TestFirstHeartbeatLandsThroughALaggingCache(t *testing.T) {
	sd := beatingHost(t, "first-beat")
	runBeat(t, &agent.Heartbeat{Client: &laggingCache{Client: cp.Client, created: map[string]time.Time{}},
		Host: "first-beat", Systemd: sd, Interval: time.Hour})
	eventually(t, "the first heartbeat", func() (bool, string) {
		var gh v1.GatewayHost
		if err := cp.Client.Get(context.Background(), client.ObjectKey{Name: "first-beat"}, &gh); err != nil {
			return false, err.Error()
		}
		return gh.Status.LastHeartbeatTime != nil, "registered without a heartbeat"
	})
}

// release lets an instance go the way the controller does for a deleted host: without its
// agent (finalizer removed, object deleted).
func release(t *testing.T, gi *v1.GatewayInstance) {
	t.Helper()
	ctx, c := context.Background(), cp.Client
	var cur v1.GatewayInstance
	if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &cur); err != nil {
		t.Fatal(err)
	}
	base := cur.DeepCopy()
	cur.Finalizers = nil
	if err := c.Patch(ctx, &cur, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, &cur); err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
}

// TestReleasedInstancesLeaveNoUnitsBehind: an instance released without the agent (its
// GatewayHost was deleted) leaves no gateway running on the machine, whether the agent runs
// when it happens or comes back after it; a profile that still has its instance is untouched.
func TestReleasedInstancesLeaveNoUnitsBehind(t *testing.T) {
	ctx, c := context.Background(), cp.Client
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	u1 := srv.Add("r1.tar.gz", r1.Data)
	h := systemdhost.Start(t, systemdhost.Options{Name: "node-orphan"})
	stop := runAgent(t, h, "node-orphan")
	t.Cleanup(func() { stop() })

	var gis []*v1.GatewayInstance
	for _, p := range []string{"keep", "live", "away"} {
		gi := newInstance(p, "node-orphan", r1, u1)
		if err := c.Create(ctx, gi); err != nil {
			t.Fatal(err)
		}
		gis = append(gis, gi)
	}
	t.Cleanup(func() {
		for _, gi := range gis {
			_ = c.Delete(ctx, gi)
		}
	})
	running := func(profile string) (uint32, string) {
		out, err := h.Exec(ctx, "systemctl", "show", "-p", "MainPID", "--value", "agent-gateway@"+profile+".service")
		if err != nil {
			return 0, err.Error()
		}
		var pid uint32
		_, _ = fmt.Sscan(strings.TrimSpace(string(out)), &pid)
		return pid, strings.TrimSpace(string(out))
	}
	for _, gi := range gis {
		eventually(t, gi.Name+" aligned", func() (bool, string) {
			var got v1.GatewayInstance
			_ = c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
			return meta.IsStatusConditionTrue(got.Status.Conditions, v1.ConditionAligned), fmt.Sprintf("%+v", got.Status.Conditions)
		})
	}
	keepPID, _ := running("keep")

	// Released while the agent runs.
	release(t, gis[1])
	eventually(t, "live's unit gone", func() (bool, string) {
		pid, out := running("live")
		_, err := os.Lstat(filepath.Join(h.Root, "etc/systemd/system/agent-gateway@live.service.d"))
		return pid == 0 && os.IsNotExist(err), "MainPID " + out
	})

	// Released while the agent is away; it removes the unit when it comes back.
	stop()
	release(t, gis[2])
	if pid, _ := running("away"); pid == 0 {
		t.Fatal("away stopped with the agent")
	}
	stop = runAgent(t, h, "node-orphan", func(o *agent.Options) { o.RunAgain = true })
	eventually(t, "away's unit gone after the agent's return", func() (bool, string) {
		pid, out := running("away")
		_, err := os.Lstat(filepath.Join(h.Root, "opt/agent/gateways/away/current"))
		return pid == 0 && os.IsNotExist(err), "MainPID " + out
	})
	if _, err := os.Stat(filepath.Join(h.Root, "opt/agent/gateways/away/home")); err != nil {
		t.Errorf("the orphan's home went too: %v", err)
	}
	if pid, _ := running("keep"); pid != keepPID {
		t.Errorf("keep, whose instance exists, went from main PID %d to %d", keepPID, pid)
	}
}

// TestTwoAgentsWithOneIdentityAreReported: two agents heart-beating one host (a cloned
// machine image) both find out, say so on the host and hold their applies; once one stops,
// the other goes on alone. Agents with a Lease tell by its holder, agents without one by the
// GatewayHost's status.agentID.
func TestTwoAgentsWithOneIdentityAreReported(t *testing.T) {
	t.Run("lease", func(t *testing.T) { testTwins(t, "twin-lease", leaseNS) })
	t.Run("status", func(t *testing.T) { testTwins(t, "twin", "") })
}

func testTwins(t *testing.T, host, leaseNamespace string) {
	ctx := context.Background()
	sd := beatingHost(t, host)
	t.Cleanup(func() {
		_ = cp.Client.Delete(context.Background(), &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: host}})
	})
	one := &agent.Heartbeat{Client: cp.Client, APIReader: cp.Client, Host: host, Systemd: sd, Interval: 300 * time.Millisecond,
		LeaseNamespace: leaseNamespace, ID: "agent-one"}
	two := &agent.Heartbeat{Client: cp.Client, APIReader: cp.Client, Host: host, Systemd: sd, Interval: 300 * time.Millisecond,
		LeaseNamespace: leaseNamespace, ID: "agent-two"}
	runBeat(t, one)
	stopTwo := runBeat(t, two)
	dup := func(want metav1.ConditionStatus) func() (bool, string) {
		return func() (bool, string) {
			var gh v1.GatewayHost
			if err := cp.Client.Get(ctx, client.ObjectKey{Name: host}, &gh); err != nil {
				return false, err.Error()
			}
			d := meta.FindStatusCondition(gh.Status.Conditions, v1.ConditionDuplicateAgent)
			return d != nil && d.Status == want, fmt.Sprintf("%+v", d)
		}
	}
	eventually(t, "DuplicateAgent", dup(metav1.ConditionTrue))
	eventually(t, "both agents holding", func() (bool, string) {
		return one.Duplicate() && two.Duplicate(), fmt.Sprintf("one %v, two %v", one.Duplicate(), two.Duplicate())
	})
	stopTwo()
	eventually(t, "one agent again", dup(metav1.ConditionFalse))
	if one.Duplicate() {
		t.Error("the remaining agent still holds")
	}
}

// frozenCache reads like an informer cache whose watch broke (the API server was away): it
// returns the first copy of each object it ever read.
type frozenCache struct {
	client.Client
	mu     sync.Mutex
	copies map[string]*v1.GatewayHost
}

func (c *frozenCache) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	gh, ok := obj.(*v1.GatewayHost)
	if !ok {
		return c.Client.Get(ctx, key, obj, opts...)
	}
	if old, ok := c.copies[key.Name]; ok {
		old.DeepCopyInto(gh)
		return nil
	}
	if err := c.Client.Get(ctx, key, obj, opts...); err != nil {
		return err
	}
	c.copies[key.Name] = gh.DeepCopy()
	return nil
}

// Heartbeats keep landing while the agent's cache lags behind the API server, as it does for
// a while after an outage of the API server: a beat written on the cache's stale copy
// conflicts, and is written again on the live object. Without that the host's heartbeat goes
// stale, the host counts as unreachable, and a rollout moves it at once as a host that serves
// nothing, beyond maxUnavailable.
func TestHeartbeatsLandThroughAStaleCache(t *testing.T) {
	ctx := context.Background()
	sd := beatingHost(t, "stale-cache")
	runBeat(t, &agent.Heartbeat{Client: &frozenCache{Client: cp.Client, copies: map[string]*v1.GatewayHost{}}, APIReader: cp.Client,
		Host: "stale-cache", Systemd: sd, Interval: 500 * time.Millisecond})
	var first *metav1.Time
	eventually(t, "heartbeats after the cache froze", func() (bool, string) {
		var gh v1.GatewayHost
		if err := cp.Client.Get(ctx, client.ObjectKey{Name: "stale-cache"}, &gh); err != nil {
			return false, err.Error()
		}
		hb := gh.Status.LastHeartbeatTime
		if hb != nil && first == nil {
			first = hb
		}
		// Heartbeat times have a resolution of a second: two seconds later is two more beats.
		return hb != nil && hb.Sub(first.Time) >= 2*time.Second, fmt.Sprintf("first %v, last %v", first, hb)
	})
}
