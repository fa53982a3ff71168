package agent_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
)

// localStub stands for the host-local microVM runner.
type localStub struct{}

func (localStub) Execute(context.Context, string, microvm.Request) (microvm.Result, error) {
	return microvm.Result{Phase: microvm.Succeeded, Start: microvm.StartCold}, nil
}

// TestToolRouterRoutes: the host's policy says which routes exist, a profile's route picks one
// of them, Auto prefers the host's own microVMs; a route the host does not offer is refused
// with the reason, as is a profile the host does not run.
func TestToolRouterRoutes(t *testing.T) {
	if _, err := agent.NewToolRouter(agent.RouteHost, nil, &agent.ClusterRuns{}); err == nil {
		t.Error("--toolrun-route=host without microVMs was accepted")
	}
	if _, err := agent.NewToolRouter("elsewhere", localStub{}, nil); err == nil {
		t.Error("an unknown route policy was accepted")
	}
	if r, err := agent.NewToolRouter(agent.RouteCluster, localStub{}, nil); r != nil || err != nil {
		t.Errorf("a host offering no route got a router %v (%v)", r, err)
	}
	host := &v1.ToolRunSettings{Route: v1.ToolRunRouteHost}
	cluster := &v1.ToolRunSettings{Route: v1.ToolRunRouteCluster} // no image: refused on the cluster route
	for _, tc := range []struct {
		policy  string
		local   bool
		profile *v1.ToolRunSettings
		route   microvm.Route
		want    string
	}{
		{agent.RouteAuto, true, nil, microvm.RouteHost, ""},
		{agent.RouteAuto, false, nil, microvm.RouteCluster, "names no image"},
		{agent.RouteAuto, true, cluster, microvm.RouteCluster, "names no image"},
		{agent.RouteAuto, false, host, "", "take route Host, and this host runs no microVMs"},
		{agent.RouteHost, true, cluster, "", "take route Cluster, and this host does not offer it (--toolrun-route=host)"},
		{agent.RouteCluster, true, nil, microvm.RouteCluster, "names no image"},
		{agent.RouteCluster, true, host, "", "take route Host, and this host runs no microVMs (--toolrun-route=cluster)"},
	} {
		var local microvm.Executor
		if tc.local {
			local = localStub{}
		}
		r, err := agent.NewToolRouter(tc.policy, local, &agent.ClusterRuns{Host: "node-r"})
		if err != nil {
			t.Fatal(err)
		}
		r.SetProfile("core", tc.profile)
		res, _ := r.Execute(context.Background(), "core", microvm.Request{Command: []string{"true"}})
		name := fmt.Sprintf("policy %s local %v profile %+v", tc.policy, tc.local, tc.profile)
		if res.Route != tc.route || !strings.Contains(res.Message, tc.want) {
			t.Errorf("%s: %+v; want route %q and a message with %q", name, res, tc.route, tc.want)
		}
		if tc.route == microvm.RouteHost && res.Phase != microvm.Succeeded {
			t.Errorf("%s: the host-local runner did not run: %+v", name, res)
		}
		r.Forget("core")
		if res, _ := r.Execute(context.Background(), "core", microvm.Request{Command: []string{"true"}}); !strings.Contains(res.Message, "does not run on this host") {
			t.Errorf("%s: a forgotten profile: %+v", name, res)
		}
	}
}

// blockingStub is a host-local runner whose runs last until release is closed.
type blockingStub struct{ started, release chan struct{} }

func (b blockingStub) Execute(context.Context, string, microvm.Request) (microvm.Result, error) {
	b.started <- struct{}{}
	<-b.release
	return microvm.Result{Phase: microvm.Succeeded}, nil
}

// TestToolRouterHostShare: one profile runs one host-local run at a time (the socket takes
// more requests, for cluster slots); another profile is not held up by it.
func TestToolRouterHostShare(t *testing.T) {
	stub := blockingStub{started: make(chan struct{}, 2), release: make(chan struct{})}
	r, err := agent.NewToolRouter(agent.RouteAuto, stub, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.SetProfile("core", nil)
	r.SetProfile("api", nil)
	first := make(chan microvm.Result, 1)
	go func() {
		res, _ := r.Execute(context.Background(), "core", microvm.Request{Command: []string{"true"}})
		first <- res
	}()
	<-stub.started
	res, _ := r.Execute(context.Background(), "core", microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Rejected || !strings.Contains(res.Message, "already has 1 host-local tool runs in progress") {
		t.Errorf("a second run of core: %+v", res)
	}
	other := make(chan microvm.Result, 1)
	go func() {
		res, _ := r.Execute(context.Background(), "api", microvm.Request{Command: []string{"true"}})
		other <- res
	}()
	<-stub.started
	close(stub.release)
	for _, ch := range []chan microvm.Result{first, other} {
		if res := <-ch; res.Phase != microvm.Succeeded || res.Route != microvm.RouteHost {
			t.Errorf("%+v", res)
		}
	}
	if res, _ := r.Execute(context.Background(), "core", microvm.Request{Command: []string{"true"}}); res.Phase != microvm.Succeeded {
		t.Errorf("core after its run ended: %+v", res)
	}
}

func clusterRuns(host string) *agent.ClusterRuns {
	return &agent.ClusterRuns{Client: cp.Client, Reader: cp.Client, Namespace: leaseNS, Host: host,
		Grace: 300 * time.Millisecond, PollInterval: 50 * time.Millisecond, OutputCap: 8}
}

var image = &v1.ToolRunSettings{Image: "busybox:1.36", ClusterSlots: 1}

// finishRun plays the ToolRun controller: once a run other than skip is in the slot, it
// writes the run's end.
func finishRun(t *testing.T, name string, skip types.UID, output string) chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		ctx := context.Background()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			var tr v1.ToolRun
			err := cp.Client.Get(ctx, client.ObjectKey{Namespace: leaseNS, Name: name}, &tr)
			if err == nil && tr.UID != skip {
				code := int32(0)
				tr.Status.Phase, tr.Status.ExitCode, tr.Status.Output = v1.ToolRunSucceeded, &code, output
				done <- cp.Client.Status().Update(ctx, &tr)
				return
			}
			if time.Now().After(deadline) {
				done <- fmt.Errorf("no run %s: %v", name, err)
				return
			}
		}
	}()
	return done
}

func gone(t *testing.T, name string) {
	t.Helper()
	eventually(t, name+" to be deleted", func() (bool, string) {
		err := cp.Client.Get(context.Background(), client.ObjectKey{Namespace: leaseNS, Name: name}, &v1.ToolRun{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}

// TestClusterRunTimesOut: a run nothing completes ends TimedOut at its timeout plus the grace,
// and is deleted.
func TestClusterRunTimesOut(t *testing.T) {
	c := clusterRuns("node-u1")
	res, err := c.Run(context.Background(), "core", image, microvm.Request{Command: []string{"sleep", "9"}, TimeoutSeconds: 1})
	if err != nil || res.Phase != microvm.TimedOut || !strings.Contains(res.Message, "no result from ToolRun") {
		t.Fatalf("%+v %v", res, err)
	}
	gone(t, v1.ToolRunSlot("core", "node-u1", 0))
}

// TestClusterRunReusesAStaleSlot: a run left in a slot by an earlier agent process is replaced;
// the output relayed is capped.
func TestClusterRunReusesAStaleSlot(t *testing.T) {
	ctx := context.Background()
	c := clusterRuns("node-u2")
	slot := v1.ToolRunSlot("core", "node-u2", 0)
	stale := &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: slot}, Spec: v1.ToolRunSpec{
		Profile: "core", Image: "busybox:1.36", Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
			corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("64Mi")}}}}
	if err := cp.Client.Create(ctx, stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cp.Client.Delete(context.Background(), &v1.ToolRun{ObjectMeta: stale.ObjectMeta}) })
	done := finishRun(t, slot, stale.UID, "0123456789abcdef")
	res, err := c.Run(ctx, "core", image, microvm.Request{Command: []string{"true"}, TimeoutSeconds: 30})
	if derr := <-done; derr != nil {
		t.Fatal(derr)
	}
	if err != nil || res.Phase != microvm.Succeeded || string(res.Stdout) != "01234567" || !res.StdoutTruncated {
		t.Fatalf("%+v (stdout %q) %v", res, res.Stdout, err)
	}
	gone(t, slot)
}

// TestClusterRunRefusals: a request the cluster route cannot carry, a profile without an
// image, and a profile whose slots are all taken are refused at once, with the reason.
func TestClusterRunRefusals(t *testing.T) {
	ctx := context.Background()
	c := clusterRuns("node-u3")
	slot := v1.ToolRunSlot("core", "node-u3", 0)
	first := make(chan microvm.Result, 1)
	go func() {
		res, _ := c.Run(ctx, "core", image, microvm.Request{Command: []string{"true"}, TimeoutSeconds: 30})
		first <- res
	}()
	eventually(t, "the first run to take the slot", func() (bool, string) {
		err := cp.Client.Get(ctx, client.ObjectKey{Namespace: leaseNS, Name: slot}, &v1.ToolRun{})
		return err == nil, fmt.Sprint(err)
	})
	many := make([]string, 65)
	for i := range many {
		many[i] = "x"
	}
	for _, tc := range []struct {
		settings *v1.ToolRunSettings
		req      microvm.Request
		want     string
	}{
		{image, microvm.Request{Command: []string{"true"}}, "holds all its 1 cluster tool-run slots"},
		{&v1.ToolRunSettings{}, microvm.Request{Command: []string{"true"}}, "names no image"},
		{image, microvm.Request{Command: many}, "at most 64 arguments"},
		{image, microvm.Request{Command: []string{"cat"}, Stdin: []byte{0xff, 0xfe}}, "UTF-8"},
		{image, microvm.Request{}, "command is empty"},
	} {
		res, err := c.Run(ctx, "core", tc.settings, tc.req)
		if err != nil || res.Phase != microvm.Rejected || !strings.Contains(res.Message, tc.want) {
			t.Errorf("%+v: %+v %v; want Rejected: %s", tc.req.Command, res, err, tc.want)
		}
	}
	if err := <-finishRun(t, slot, "", "ok"); err != nil {
		t.Fatal(err)
	}
	if res := <-first; res.Phase != microvm.Succeeded {
		t.Errorf("the first run: %+v", res)
	}
	gone(t, slot)
}

// deadlines records the API calls made without a deadline.
type deadlines struct {
	client.Client
	mu      sync.Mutex
	without []string
}

func (d *deadlines) check(ctx context.Context, call string) {
	if _, ok := ctx.Deadline(); !ok {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.without = append(d.without, call)
	}
}

func (d *deadlines) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	d.check(ctx, "get")
	return d.Client.Get(ctx, key, obj, opts...)
}

func (d *deadlines) Create(ctx context.Context, obj client.Object, opts ...client.CreateOption) error {
	d.check(ctx, "create")
	return d.Client.Create(ctx, obj, opts...)
}

func (d *deadlines) Delete(ctx context.Context, obj client.Object, opts ...client.DeleteOption) error {
	d.check(ctx, "delete")
	return d.Client.Delete(ctx, obj, opts...)
}

// TestClusterRunCallsHaveDeadlines: every API call of a cluster run, replacing a stale run
// included, is bounded, so a stalled API server cannot hold a gateway's request (and its
// socket share) forever.
func TestClusterRunCallsHaveDeadlines(t *testing.T) {
	ctx := context.Background()
	d := &deadlines{Client: cp.Client}
	c := clusterRuns("node-u4")
	c.Client, c.Reader = d, d
	slot := v1.ToolRunSlot("core", "node-u4", 0)
	stale := &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: slot}, Spec: v1.ToolRunSpec{
		Profile: "core", Image: "busybox:1.36", Resources: image.ClusterResources()}}
	if err := cp.Client.Create(ctx, stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cp.Client.Delete(context.Background(), &v1.ToolRun{ObjectMeta: stale.ObjectMeta}) })
	done := finishRun(t, slot, stale.UID, "ok")
	res, err := c.Run(ctx, "core", image, microvm.Request{Command: []string{"true"}, TimeoutSeconds: 30})
	if derr := <-done; derr != nil {
		t.Fatal(derr)
	}
	if err != nil || res.Phase != microvm.Succeeded {
		t.Fatalf("%+v %v", res, err)
	}
	gone(t, slot)
	if len(d.without) > 0 {
		t.Errorf("API calls without a deadline: %v", d.without)
	}
}
