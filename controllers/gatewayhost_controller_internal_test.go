package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func TestReachability(t *testing.T) {
	now := time.Unix(1000, 0)
	at := func(ago time.Duration) *metav1.Time { m := metav1.NewTime(now.Add(-ago)); return &m }
	msgs := map[bool]map[string]bool{true: {}, false: {}}
	for _, tc := range []struct {
		last *metav1.Time
		ok   bool
	}{
		{nil, false},
		{at(0), true},
		{at(39 * time.Second), true},
		{at(41 * time.Second), false},
	} {
		ok, msg, next := Reachability(tc.last, 40*time.Second, now)
		if ok != tc.ok || (ok && next <= 0) || (!ok && next != 0) || msg == "" {
			t.Errorf("Reachability(%v) = %v, %q, %v; want ok=%v", tc.last, ok, msg, next, tc.ok)
		}
		msgs[ok][msg] = true
	}
	// A fresh heartbeat of any age reads the same, or every check would write the condition.
	if len(msgs[true]) != 1 {
		t.Errorf("reachable hosts got different messages: %v", msgs[true])
	}
	// A stale one names when it was last heard of, which later checks do not change.
	if ok, a, _ := Reachability(at(time.Minute), 40*time.Second, now); ok {
		t.Error("a heartbeat a minute old is fresh")
	} else if _, b, _ := Reachability(at(time.Minute), 40*time.Second, now.Add(time.Hour)); a != b {
		t.Errorf("a stale heartbeat reads %q, then %q an hour later", a, b)
	}
}

// A controller that has just started (a new leader, or back after the API server was away)
// has not watched heartbeats for a grace period: a host that was reachable stays so until it
// has missed one under its eyes, however old its last heartbeat (five minutes, after an
// outage of the API server). A host already unreachable, or that never reported, stays so.
func TestReachabilitySince(t *testing.T) {
	grace := 40 * time.Second
	since := time.Unix(1000, 0)
	old := metav1.NewTime(since.Add(-5 * time.Minute))
	for _, tc := range []struct {
		name         string
		last         *metav1.Time
		wasReachable bool
		now          time.Time
		ok           bool
	}{
		{"reachable, just started", &old, true, since, true},
		{"reachable, within a grace period of the start", &old, true, since.Add(39 * time.Second), true},
		{"reachable, a grace period after the start", &old, true, since.Add(41 * time.Second), false},
		{"unreachable before the start", &old, false, since, false},
		{"never reported", nil, true, since, false},
	} {
		ok, msg, next := ReachabilitySince(tc.last, tc.wasReachable, grace, since, tc.now)
		if ok != tc.ok || msg == "" || (ok && next <= 0) {
			t.Errorf("%s: ReachabilitySince = %v, %q, %v; want %v", tc.name, ok, msg, next, tc.ok)
		}
		if ok && tc.now.Add(next).Before(since.Add(grace)) {
			t.Errorf("%s: asks to look again after %v, before the grace period from the start ends", tc.name, next)
		}
	}
}

func TestConfigHashFollowsSpec(t *testing.T) {
	a := configHashOf(t, "1.0.0")
	if a != configHashOf(t, "1.0.0") {
		t.Error("the same spec hashed differently")
	}
	if a == configHashOf(t, "2.0.0") {
		t.Error("a different release kept the hash")
	}
	capped := func(tasks int32) string {
		p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "core"}, Spec: v1.GatewayProfileSpec{Release: "r"}}
		p.Spec.Resources.TasksMax = tasks
		r := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "r"}, Spec: v1.ReleaseSpec{SHA256: "x", Label: "1.0.0"}}
		return profileSpec(p, r).forHost("h").ConfigHash
	}
	if capped(64) == capped(128) {
		t.Error("a different tasksMax kept the hash")
	}
}

func configHashOf(t *testing.T, label string) string {
	t.Helper()
	p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "core"}, Spec: v1.GatewayProfileSpec{Release: "r"}}
	r := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "r"}, Spec: v1.ReleaseSpec{SHA256: "x", Label: label}}
	return profileSpec(p, r).forHost("h").ConfigHash
}

// A Lease renewal of a reachable host wakes nothing; one of a host that is not Reachable, a
// renewTime that moved backwards, and a Lease appearing or going wake the host.
func TestHostOfLease(t *testing.T) {
	ctx := context.Background()
	hostWith := func(name string, reachable metav1.ConditionStatus) *v1.GatewayHost {
		h := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if reachable != "" {
			h.Status.Conditions = []metav1.Condition{{Type: v1.ConditionReachable, Status: reachable, Reason: "R", LastTransitionTime: metav1.Now()}}
		}
		return h
	}
	s := runtime.NewScheme()
	_ = v1.AddToScheme(s)
	r := &GatewayHostReconciler{Client: fake.NewClientBuilder().WithScheme(s).WithObjects(
		hostWith("up", metav1.ConditionTrue), hostWith("down", metav1.ConditionFalse), hostWith("new", "")).Build()}
	h := r.hostOfLease()
	t0 := time.Unix(1000, 0)
	lease := func(name string, at time.Time) *coordinationv1.Lease {
		m := metav1.NewMicroTime(at)
		return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns"}, Spec: coordinationv1.LeaseSpec{RenewTime: &m}}
	}
	woken := func(do func(q workqueue.TypedRateLimitingInterface[reconcile.Request])) []string {
		q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
		defer q.ShutDown()
		do(q)
		var names []string
		for q.Len() > 0 {
			req, _ := q.Get()
			names = append(names, req.Name)
		}
		return names
	}
	renew := func(name string, from, to time.Time) []string {
		return woken(func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Update(ctx, event.TypedUpdateEvent[*coordinationv1.Lease]{ObjectOld: lease(name, from), ObjectNew: lease(name, to)}, q)
		})
	}
	for _, tc := range []struct {
		what string
		got  []string
		want string
	}{
		{"a reachable host's renewal", renew("up", t0, t0.Add(10*time.Second)), "[]"},
		{"an unreachable host's renewal", renew("down", t0, t0.Add(10*time.Second)), "[down]"},
		{"a renewal of a host not yet judged", renew("new", t0, t0.Add(10*time.Second)), "[new]"},
		{"a renewal without a host", renew("gone", t0, t0.Add(10*time.Second)), "[]"},
		{"a renewTime moved backwards", renew("up", t0, t0.Add(-time.Hour)), "[up]"},
		{"a new Lease", woken(func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Create(ctx, event.TypedCreateEvent[*coordinationv1.Lease]{Object: lease("up", t0)}, q)
		}), "[up]"},
		{"a deleted Lease", woken(func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Delete(ctx, event.TypedDeleteEvent[*coordinationv1.Lease]{Object: lease("up", t0)}, q)
		}), "[up]"},
	} {
		if got := fmt.Sprint(tc.got); got != tc.want && !(tc.want == "[]" && tc.got == nil) {
			t.Errorf("%s woke %s; want %s", tc.what, got, tc.want)
		}
	}
}

// The cache keeps of a Lease only its identity and renewTime.
func TestSlimLease(t *testing.T) {
	m := metav1.NewMicroTime(time.Unix(1000, 0))
	holder, secs := "agent-1", int32(40)
	o, err := slimLease(&coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "h", Namespace: "ns", ResourceVersion: "7", Labels: map[string]string{"a": "b"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "x"}}},
		Spec: coordinationv1.LeaseSpec{RenewTime: &m, AcquireTime: &m, HolderIdentity: &holder, LeaseDurationSeconds: &secs},
	})
	if err != nil {
		t.Fatal(err)
	}
	l := o.(*coordinationv1.Lease)
	want := coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "h", Namespace: "ns", ResourceVersion: "7"}, Spec: coordinationv1.LeaseSpec{RenewTime: &m}}
	if !equality.Semantic.DeepEqual(*l, want) {
		t.Errorf("slimLease kept %+v", l)
	}
}
