package controllers_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
)

// wakes counts the requests a controller with the GatewayProfile controller's watches gets,
// by profile.
type wakes struct {
	mu sync.Mutex
	n  map[string]int
}

func (w *wakes) Reconcile(_ context.Context, req ctrl.Request) (ctrl.Result, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n[req.Name]++
	return ctrl.Result{}, nil
}

func (w *wakes) of(name string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n[name]
}

// startWakeCounter runs, beside the suite's manager, a manager of its own whose only controller
// has the profile controller's watches and counts what they wake.
func startWakeCounter(t *testing.T) *wakes {
	t.Helper()
	mgr, err := ctrl.NewManager(cp.Config, ctrl.Options{Scheme: cp.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Controller: config.Controller{SkipNameValidation: ptr(true)}})
	if err != nil {
		t.Fatal(err)
	}
	w := &wakes{n: map[string]int{}}
	if err := controllers.SetupProfileWatches(mgr, w); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return w
}

// TestHeartbeatsWakeNoProfile: hosts heart-beating wake no profile and make the manager write
// nothing, while what a profile decides on (a host's labels, unschedulable, reachability,
// creation and deletion, its release) still wakes the profiles it concerns, and only those.
func TestHeartbeatsWakeNoProfile(t *testing.T) {
	ctx := context.Background()
	hostNames := []string{"wake-a", "wake-b", "wake-c"}
	for _, n := range hostNames[:2] {
		mustCreate(t, host(n, map[string]string{"fleet": "wake"}))
	}
	mustCreate(t, host("wake-c", map[string]string{"fleet": "spare"}))
	// Releases that do not exist yet: nothing else changes these profiles meanwhile.
	mustCreate(t, profile("wake-sel", "wake-r1", map[string]string{"fleet": "wake"}))
	mustCreate(t, profile("wake-none", "wake-r2", map[string]string{"fleet": "nowhere"}))

	rv := map[string]string{}
	beat := func(name string) {
		t.Helper()
		var h v1.GatewayHost
		if err := c.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
			t.Fatal(err)
		}
		if last, ok := rv[name]; ok && h.ResourceVersion != last {
			t.Errorf("%s was written by someone else since its last heartbeat: %+v", name, h.Status.Conditions)
		}
		if err := renewLease(ctx, name, time.Now()); err != nil {
			t.Fatal(err)
		}
		rv[name] = h.ResourceVersion
	}
	reachable := func(name string, want metav1.ConditionStatus) func() (bool, string) {
		return func() (bool, string) {
			var h v1.GatewayHost
			if err := c.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
				return false, err.Error()
			}
			cond := meta.FindStatusCondition(h.Status.Conditions, v1.ConditionReachable)
			return cond != nil && cond.Status == want, fmt.Sprintf("%+v", cond)
		}
	}
	for _, n := range hostNames {
		beat(n)
		eventually(t, n+" reachable", reachable(n, metav1.ConditionTrue))
		delete(rv, n) // the manager wrote Reachable
	}
	for _, p := range []string{"wake-sel", "wake-none"} {
		eventually(t, p+" handled by the manager", func() (bool, string) {
			var gp v1.GatewayProfile
			if err := c.Get(ctx, client.ObjectKey{Name: p}, &gp); err != nil {
				return false, err.Error()
			}
			return meta.FindStatusCondition(gp.Status.Conditions, v1.ConditionReady) != nil, fmt.Sprintf("%+v", gp.Status.Conditions)
		})
	}

	w := startWakeCounter(t)
	settled := func(what string) (sel, none int) {
		t.Helper()
		eventually(t, what, func() (bool, string) {
			sel, none = w.of("wake-sel"), w.of("wake-none")
			time.Sleep(time.Second)
			return sel > 0 && none > 0 && w.of("wake-sel") == sel && w.of("wake-none") == none,
				fmt.Sprintf("wake-sel %d, wake-none %d", sel, none)
		})
		return sel, none
	}
	sel0, none0 := settled("the counter's first wakes")

	// Beats spaced out, each its own event, over more than one grace period: the manager's own
	// check of each host runs in between and must find nothing to write.
	for range 6 {
		for _, n := range hostNames {
			beat(n)
			time.Sleep(500 * time.Millisecond)
		}
	}
	// Keep the hosts reachable from here on; wake-a beats on its own so it can stop alone.
	stopA := simulatedAgentHeartbeats(t, "wake-a")
	simulatedAgentHeartbeats(t, "wake-b", "wake-c")

	// A label change that selects wake-c for wake-sel. Its event comes after every heartbeat's,
	// so once it is counted the heartbeats have been seen.
	patchHost := func(name, patch string) {
		t.Helper()
		h := &v1.GatewayHost{}
		h.Name = name
		if err := c.Patch(ctx, h, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
			t.Fatal(err)
		}
	}
	wokenBy := func(what, profile string, do func()) {
		t.Helper()
		before := w.of(profile)
		do()
		eventually(t, what+" wakes "+profile, func() (bool, string) {
			return w.of(profile) > before, fmt.Sprintf("%d wakes", w.of(profile))
		})
	}
	wokenBy("a new label", "wake-sel", func() { patchHost("wake-c", `{"metadata":{"labels":{"fleet":"wake"}}}`) })
	if n := w.of("wake-sel") - sel0; n > 3 {
		t.Errorf("18 heartbeats and one label change woke wake-sel %d times; want the label change's alone", n)
	}
	if n := w.of("wake-none") - none0; n != 0 {
		t.Errorf("heartbeats of hosts it does not select woke wake-none %d times", n)
	}

	wokenBy("cordoning", "wake-sel", func() { patchHost("wake-b", `{"spec":{"unschedulable":true}}`) })
	wokenBy("a host going unreachable", "wake-sel", func() {
		stopA()
		eventually(t, "wake-a unreachable", reachable("wake-a", metav1.ConditionFalse))
	})
	wokenBy("a host coming back", "wake-sel", func() {
		simulatedAgentHeartbeats(t, "wake-a")
		eventually(t, "wake-a reachable again", reachable("wake-a", metav1.ConditionTrue))
	})
	wokenBy("a label leaving the selector", "wake-sel", func() { patchHost("wake-c", `{"metadata":{"labels":{"fleet":"spare"}}}`) })
	wokenBy("a host's deletion", "wake-sel", func() {
		if err := c.Delete(ctx, host("wake-b", nil)); err != nil {
			t.Fatal(err)
		}
	})
	if n := w.of("wake-none") - none0; n != 0 {
		t.Errorf("changes of hosts it never selected woke wake-none %d times", n)
	}
	wokenBy("a new host it selects", "wake-none", func() { mustCreate(t, host("wake-d", map[string]string{"fleet": "nowhere"})) })

	// A release wakes the profiles that name it, and no other.
	sel1 := w.of("wake-sel")
	wokenBy("its release appearing", "wake-none", func() { mustCreate(t, rel("wake-r2", "1.0.0", shaA)) })
	if n := w.of("wake-sel") - sel1; n != 0 {
		t.Errorf("another profile's release woke wake-sel %d times", n)
	}
}

// TestReleaseLetGoWhenProfileMoves: a profile moved to another release no longer counts as a
// user of the one it left, which may then be deleted.
func TestReleaseLetGoWhenProfileMoves(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, rel("mv-r1", "1.0.0", shaA))
	mustCreate(t, rel("mv-r2", "2.0.0", shaB))
	mustCreate(t, profile("mv", "mv-r1", map[string]string{"pool": "none"}))
	users := func(release string, want ...string) func() (bool, string) {
		return func() (bool, string) {
			var r v1.Release
			if err := c.Get(ctx, client.ObjectKey{Name: release}, &r); err != nil {
				return false, err.Error()
			}
			return fmt.Sprint(r.Status.Profiles) == fmt.Sprint(want), fmt.Sprintf("%s is used by %v", release, r.Status.Profiles)
		}
	}
	eventually(t, "mv-r1 used by mv", users("mv-r1", "mv"))
	p := getProfile(t, "mv")
	if err := c.Patch(ctx, p, client.RawPatch(types.MergePatchType, []byte(`{"spec":{"release":"mv-r2"}}`))); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mv-r2 used by mv", users("mv-r2", "mv"))
	eventually(t, "mv-r1 used by nobody", users("mv-r1"))
}
