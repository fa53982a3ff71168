package security_test

// The cluster route of tool runs: a node agent creates ToolRuns on its profiles' behalf, only
// under the slot names <profile>.<host>.<k> the controller manager grants its host, in the
// operator's namespace, and reads back only its own runs.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/poll"
)

// toolRouteEnv is two hosts selected by a profile with cluster tool runs ("<p>-tools", two
// slots) and by one without ("<p>-plain"), with the controller manager running under its own
// identity, and the hosts' agents.
type toolRouteEnv struct {
	hosts  [2]string
	agents [2]client.WithWatch
	tools  string
	plain  string
}

func setUpToolRoute(t *testing.T, prefix string) *toolRouteEnv {
	t.Helper()
	toolRunSetUp(t) // the manager policies
	ctx := context.Background()
	e := &toolRouteEnv{hosts: [2]string{prefix + "-h1", prefix + "-h2"}, tools: prefix + "-tools", plain: prefix + "-plain"}
	sel := map[string]string{"role": prefix}
	// The manager's tool-run Pods need the namespace's default service account.
	if err := admin.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: materialNS}}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	for i, h := range e.hosts {
		gh := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: h, Labels: sel}}
		if err := admin.Create(ctx, gh); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, gh)
		e.agents[i] = newWatchUser(t, "system:gateway-agent:"+h, agentGroup)
	}
	rel := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: prefix + "-r1"}, Spec: v1.ReleaseSpec{
		Source: v1.ReleaseSource{URL: "https://example.com/a.tgz"}, SHA256: sha, Label: "1.0.0"}}
	if err := admin.Create(ctx, rel); err != nil {
		t.Fatal(err)
	}
	deleteLater(t, rel)
	for _, p := range []struct {
		name string
		tr   *v1.ToolRunSettings
	}{
		{e.tools, &v1.ToolRunSettings{Route: v1.ToolRunRouteCluster, Image: "busybox:1.36", ClusterSlots: 2}},
		{e.plain, &v1.ToolRunSettings{Route: v1.ToolRunRouteHost}},
	} {
		gp := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: p.name}, Spec: v1.GatewayProfileSpec{
			Release: rel.Name, NodeSelector: metav1.LabelSelector{MatchLabels: sel}}}
		gp.Spec.ToolRuns = p.tr
		if err := admin.Create(ctx, gp); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { releaseProfile(t, p.name) })
	}
	runManager(t)
	// Granted by the manager under its role and policy: a refusal of either times out here.
	for i, h := range e.hosts {
		slot := v1.ToolRunSlot(e.tools, h, 0)
		poll.Until(t, h+" to be granted its slot "+slot, 90*time.Second, func() (bool, string) {
			err := e.agents[i].Get(ctx, client.ObjectKey{Namespace: materialNS, Name: slot}, &v1.ToolRun{})
			return apierrors.IsNotFound(err), fmt.Sprint(err)
		})
	}
	return e
}

// agentToolRun is the ToolRun an agent would create for profile under name.
func agentToolRun(ns, name, profile string) *v1.ToolRun {
	return &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name,
		Labels: map[string]string{v1.LabelProfile: profile, v1.LabelHost: hostOfSlot(name)}}, Spec: v1.ToolRunSpec{
		Profile: profile, Image: "busybox:1.36", Command: []string{"true"}, TimeoutSeconds: 30,
		Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}}}}
}

// hostOfSlot is the host part of a slot name <profile>.<host>.<k> (profile and host are DNS
// labels), or the name itself when it has no such form.
func hostOfSlot(name string) string {
	parts := strings.Split(name, ".")
	if len(parts) != 3 {
		return name
	}
	return parts[1]
}

// removeRun deletes a run and what the ToolRun controller made for it (envtest has no garbage
// collector).
func removeRun(t *testing.T, ns, name string) {
	ctx := context.Background()
	for _, o := range []client.Object{
		&v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}},
		&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trun-" + name}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trun-" + name}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trun-" + name + "-stdin"}},
	} {
		if err := admin.Delete(ctx, o, client.GracePeriodSeconds(0)); client.IgnoreNotFound(err) != nil {
			t.Errorf("clean up %s: %v", o.GetName(), err)
		}
	}
}

// TestAgentCreatesToolRunsOnlyInItsSlots: with real identities, the manager's grants and the
// agent admission policy, an agent creates a ToolRun for a profile its host runs with cluster
// runs, in the operator's namespace, under its own slot name; it is refused for a profile
// without cluster runs, a profile its host does not run, another namespace, another host's
// slot, a slot beyond the share, or a spec.profile other than the slot's; it cannot read or
// delete another host's run; a host that leaves the selection loses its slots.
func TestAgentCreatesToolRunsOnlyInItsSlots(t *testing.T) {
	e := setUpToolRoute(t, "trs")
	h1, h2 := e.hosts[0], e.hosts[1]
	a1, a2 := e.agents[0], e.agents[1]
	create := func(c client.Client, ns, name, profile string) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			t.Cleanup(func() { removeRun(t, ns, name) }) // the outer test's: runs outlive their step
			return c.Create(ctx, agentToolRun(ns, name, profile))
		}
	}
	deny := func(h string) string { return "gateway agent for host " + h + " may not create ToolRun " }
	own := v1.ToolRunSlot(e.tools, h1, 0)
	runSteps(t, []step{
		{"its own slot", create(a1, materialNS, own, e.tools), allowed},
		{"its second slot", create(a1, materialNS, v1.ToolRunSlot(e.tools, h1, 1), e.tools), allowed},
		{"a slot beyond the profile's share", create(a1, materialNS, v1.ToolRunSlot(e.tools, h1, 2), e.tools),
			byPolicy(deny(h1), "is not granted to host "+h1, "beyond its clusterSlots")},
		{"a profile without cluster runs", create(a1, materialNS, v1.ToolRunSlot(e.plain, h1, 0), e.plain),
			byPolicy("ToolRun slot " + v1.ToolRunSlot(e.plain, h1, 0) + " in namespace " + materialNS + " is not granted to host " + h1)},
		{"a profile the host does not run", create(a1, materialNS, v1.ToolRunSlot("core", h1, 0), "core"),
			byPolicy("is not granted to host " + h1)},
		{"another host's slot", create(a1, materialNS, v1.ToolRunSlot(e.tools, h2, 0), e.tools),
			byPolicy(deny(h1), "is named <spec.profile>.<its host>.<slot>, here "+e.tools+"."+h1+".<slot>")},
		{"its slot with another spec.profile", create(a1, materialNS, v1.ToolRunSlot(e.tools, h1, 1), e.plain),
			byPolicy("here " + e.plain + "." + h1 + ".<slot>")},
		{"its slot name in another namespace", create(a1, runsNS, own, e.tools), byRBAC("create", "toolruns")},
	})

	// Reads: its own run by name, not another host's, nor any list or watch.
	ctx := context.Background()
	if err := a1.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: own}, &v1.ToolRun{}); err != nil {
		t.Errorf("%s reads its own run: %v", h1, err)
	}
	errs := reads(ctx, a2, &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Name: own}}, &v1.ToolRunList{})
	errs["delete"] = a2.Delete(ctx, &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: own}})
	errs["status"] = a2.Status().Patch(ctx, &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: own}}, mergePatch(`{}`))
	for verb, err := range errs {
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s %s %s's run: want Forbidden, got %v", h2, verb, h1, err)
		}
	}
	if err := a1.Delete(ctx, &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: own}}); err != nil {
		t.Errorf("%s deletes its own run: %v", h1, err)
	}

	// h2 leaves the selection: its instances are being removed, and its slots go.
	if err := editHost(ctx, admin, h2, func(h *v1.GatewayHost) { h.Labels = map[string]string{"role": "elsewhere"} }); err != nil {
		t.Fatal(err)
	}
	slot := v1.ToolRunSlot(e.tools, h2, 0)
	poll.Until(t, h2+" to lose its slot", 60*time.Second, func() (bool, string) {
		err := a2.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: slot}, &v1.ToolRun{})
		return apierrors.IsForbidden(err), fmt.Sprint(err)
	})
	runSteps(t, []step{
		{"a host that left the selection", create(a2, materialNS, slot, e.tools), byPolicy("is not granted to host " + h2)},
	})
}

// TestAgentToolRunIsOnlyTheRoutesRun: in its own slot, an agent creates only the run its
// router makes of a gateway's request (labeled with its host and profile, no network, no
// args, a timeout the socket allows, no finalizer or owner); a compromised agent cannot use a slot for a
// run with egress, or one that outlives what a gateway may ask for.
func TestAgentToolRunIsOnlyTheRoutesRun(t *testing.T) {
	e := setUpToolRoute(t, "tra")
	h1, a1 := e.hosts[0], e.agents[0]
	own := v1.ToolRunSlot(e.tools, h1, 0)
	create := func(edit func(*v1.ToolRun)) func(*testing.T, context.Context) error {
		return func(t *testing.T, ctx context.Context) error {
			tr := agentToolRun(materialNS, own, e.tools)
			edit(tr)
			err := a1.Create(ctx, tr)
			if err == nil {
				if tr.Finalizers != nil {
					_ = admin.Patch(ctx, tr, mergePatch(`{"metadata":{"finalizers":null}}`))
				}
				removeRun(t, materialNS, own)
				poll.Until(t, "the run to be gone", 30*time.Second, func() (bool, string) {
					err := admin.Get(ctx, client.ObjectKeyFromObject(tr), &v1.ToolRun{})
					return apierrors.IsNotFound(err), fmt.Sprint(err)
				})
			}
			return err
		}
	}
	deny := "gateway agent for host " + h1 + " may not create ToolRun " + materialNS + "/" + own
	runSteps(t, []step{
		{"network egress", create(func(tr *v1.ToolRun) {
			tr.Spec.Network = v1.ToolRunNetwork{Mode: v1.ToolRunNetworkAllowlist, Allow: []string{"10.0.0.0/8"}}
		}), byPolicy(deny, "no network")},
		{"args", create(func(tr *v1.ToolRun) { tr.Spec.Args = []string{"-c", "id"} }), byPolicy(deny, "no args")},
		{"a day's timeout", create(func(tr *v1.ToolRun) { tr.Spec.TimeoutSeconds = 86400 }), byPolicy(deny, "at most 600")},
		{"a finalizer", create(func(tr *v1.ToolRun) { tr.Finalizers = []string{"example.com/keep"} }), byPolicy(deny, "no finalizer")},
		{"an owner", create(func(tr *v1.ToolRun) {
			var gh v1.GatewayHost
			if err := admin.Get(context.Background(), client.ObjectKey{Name: h1}, &gh); err != nil {
				t.Fatal(err)
			}
			tr.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1.GroupVersion.String(), Kind: "GatewayHost", Name: h1, UID: gh.UID}}
		}), byPolicy(deny, "no finalizer or owner")},
		{"no host label", create(func(tr *v1.ToolRun) { delete(tr.Labels, v1.LabelHost) }), byPolicy(deny, "labeled")},
		{"another profile's label", create(func(tr *v1.ToolRun) { tr.Labels[v1.LabelProfile] = e.plain }), byPolicy(deny, "labeled")},
		{"the route's run", create(func(*v1.ToolRun) {}), allowed},
	})

	// A run in its slot that no agent of its host created (made by hand, unlabeled) is not the
	// agent's to delete.
	ctx := context.Background()
	byHand := agentToolRun(materialNS, own, e.tools)
	byHand.Labels = nil
	if err := admin.Create(ctx, byHand); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeRun(t, materialNS, own) })
	runSteps(t, []step{
		{"delete a run made by hand in its slot", func(_ *testing.T, ctx context.Context) error {
			return a1.Delete(ctx, &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: own}})
		}, byPolicy("it is not a run of host " + h1)},
	})
	// The route says so, and leaves the run alone.
	cluster := &agent.ClusterRuns{Client: a1, Reader: a1, Namespace: materialNS, Host: h1}
	res, err := cluster.Run(ctx, e.tools, &v1.ToolRunSettings{Image: "busybox:1.36"}, microvm.Request{Command: []string{"true"}})
	if err != nil || res.Phase != microvm.Rejected || !strings.Contains(res.Message, "holds a run this host's agent did not create") {
		t.Errorf("a run in a slot held by a hand-made run: %+v %v", res, err)
	}
	var still v1.ToolRun
	if err := admin.Get(ctx, client.ObjectKeyFromObject(byHand), &still); err != nil || still.UID != byHand.UID {
		t.Errorf("the hand-made run: %v", err)
	}
}

// TestToolRunRoutedToTheCluster_FakeKubelet: a gateway's request on its tool-run socket takes
// the cluster route: the agent's router, under the agent's real identity, creates the ToolRun
// in its slot; the controller manager makes its Pod; a kubelet stand-in completes it; the reply
// comes back through the socket with Route Cluster, and the run is deleted.
func TestToolRunRoutedToTheCluster_FakeKubelet(t *testing.T) {
	e := setUpToolRoute(t, "trc")
	h1 := e.hosts[0]
	ctx := context.Background()
	ac := e.agents[0]
	cluster := &agent.ClusterRuns{Client: ac, Reader: ac, Namespace: materialNS, Host: h1, PollInterval: 200 * time.Millisecond}
	router, err := agent.NewToolRouter(agent.RouteAuto, nil, cluster)
	if err != nil || router == nil {
		t.Fatalf("router %v: %v", router, err)
	}
	router.SetProfile(e.tools, &v1.ToolRunSettings{Route: v1.ToolRunRouteCluster, Image: "busybox:1.36", ClusterSlots: 2})
	router.SetProfile(e.plain, &v1.ToolRunSettings{Route: v1.ToolRunRouteHost})
	sockets := &microvm.Sockets{Executor: router, PerProfile: 2}
	t.Cleanup(sockets.Close)
	home := t.TempDir()
	owner := microvm.Owner{UID: 0, GID: 0} // the test's own uid: root in CI
	if err := sockets.Ensure(e.tools, home, owner); err != nil {
		t.Fatal(err)
	}
	slot := v1.ToolRunSlot(e.tools, h1, 0)
	t.Cleanup(func() { removeRun(t, materialNS, slot) })

	// The kubelet stand-in: completes the run's Pod once the manager has made it.
	kubelet := make(chan error, 1)
	go func() {
		var pod corev1.Pod
		deadline := time.Now().Add(60 * time.Second)
		for {
			err := admin.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "trun-" + slot}, &pod)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				kubelet <- fmt.Errorf("no pod trun-%s: %w", slot, err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		now := metav1.Now()
		pod.Status.StartTime, pod.Status.Phase = &now, corev1.PodFailed
		pod.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "tool", Image: pod.Spec.Containers[0].Image,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 5, Message: "ran in the cluster\n", Reason: "Error"}}}}
		kubelet <- admin.Status().Update(ctx, &pod)
	}()

	reply := askSocket(t, filepath.Join(home, "run", microvm.SocketName),
		microvm.Request{Command: []string{"sh", "-c", "echo ran in the cluster; exit 5"}, Stdin: []byte("question"), TimeoutSeconds: 30})
	if err := <-kubelet; err != nil {
		t.Fatal(err)
	}
	if reply.Route != microvm.RouteCluster || reply.Phase != microvm.Failed || reply.ExitCode != 5 || string(reply.Stdout) != "ran in the cluster\n" {
		t.Fatalf("reply %+v (stdout %q)", reply, reply.Stdout)
	}
	t.Logf("cluster route: %d ms from request to result", reply.DurationMillis)
	poll.Until(t, "the agent to delete its run", 30*time.Second, func() (bool, string) {
		err := admin.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: slot}, &v1.ToolRun{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})

	// A profile whose tool runs take route Host is refused on a host without microVMs, and is
	// told why; so is one that names no image for the cluster.
	router.SetProfile("noimage", &v1.ToolRunSettings{})
	for profile, want := range map[string]string{
		e.plain:   "take route Host, and this host runs no microVMs",
		"noimage": "names no image for cluster tool runs",
	} {
		home := t.TempDir()
		if err := sockets.Ensure(profile, home, owner); err != nil {
			t.Fatal(err)
		}
		reply := askSocket(t, filepath.Join(home, "run", microvm.SocketName), microvm.Request{Command: []string{"true"}})
		if reply.Phase != microvm.Rejected || !strings.Contains(reply.Message, want) {
			t.Errorf("%s: reply %+v, want Rejected: %s", profile, reply, want)
		}
	}
}

// askSocket sends one request on a tool-run socket and reads the reply.
func askSocket(t *testing.T, path string, req microvm.Request) microvm.Result {
	t.Helper()
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Minute))
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		t.Fatal(err)
	}
	var res microvm.Result
	if err := json.NewDecoder(conn).Decode(&res); err != nil {
		t.Fatal(err)
	}
	return res
}
