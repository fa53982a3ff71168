package controllers

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
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
		return profileSpec(p, r, nil).forHost("h").ConfigHash
	}
	if capped(64) == capped(128) {
		t.Error("a different tasksMax kept the hash")
	}
}

func configHashOf(t *testing.T, label string) string {
	t.Helper()
	p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "core"}, Spec: v1.GatewayProfileSpec{Release: "r"}}
	r := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "r"}, Spec: v1.ReleaseSpec{SHA256: "x", Label: label}}
	return profileSpec(p, r, nil).forHost("h").ConfigHash
}

// A list of the Leases wakes a host when a renewal may make it Reachable (it is not now), when a
// reachable host's heartbeat is older than the grace period, when its renewTime moved
// backwards, and when its Lease is gone; a renewal of a reachable host wakes nothing.
func TestLeaseViewWakes(t *testing.T) {
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
	v := &leaseView{hosts: fake.NewClientBuilder().WithScheme(s).WithObjects(
		hostWith("up", metav1.ConditionTrue), hostWith("down", metav1.ConditionFalse), hostWith("new", ""),
		hostWith("back", metav1.ConditionTrue), hostWith("going", metav1.ConditionTrue), hostWith("still", metav1.ConditionFalse),
		hostWith("quiet", metav1.ConditionTrue)).Build(), grace: 40 * time.Second}
	t0 := time.Unix(1000, 0)
	lease := func(name string, at time.Time) coordinationv1.Lease {
		m := metav1.NewMicroTime(at)
		return coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns"}, Spec: coordinationv1.LeaseSpec{RenewTime: &m}}
	}
	first := v.update(ctx, []coordinationv1.Lease{lease("up", t0), lease("down", t0), lease("new", t0), lease("back", t0),
		lease("going", t0), lease("still", t0), lease("nohost", t0), lease("quiet", t0.Add(-35*time.Second))}, t0)
	sort.Strings(first)
	if got := fmt.Sprint(first); got != "[down new still]" {
		t.Errorf("the first list woke %s; want the hosts not Reachable: [down new still]", got)
	}
	next := t0.Add(10 * time.Second)
	woken := v.update(ctx, []coordinationv1.Lease{lease("up", next), lease("down", next), lease("new", next),
		lease("back", t0.Add(-time.Hour)), lease("still", t0), lease("nohost", next), lease("quiet", t0.Add(-35*time.Second))}, next)
	sort.Strings(woken)
	// up: renewed but reachable; still: not renewed; nohost: no GatewayHost (its creation wakes
	// it); quiet: reachable, not renewed for 45 s, longer than the grace period.
	if got := fmt.Sprint(woken); got != "[back down going new quiet]" {
		t.Errorf("the second list woke %s; want [back down going new quiet]", got)
	}
	if rt, at, ok := v.renewed("up"); !ok || !rt.Equal(next) || !at.Equal(next) {
		t.Errorf("renewed(up) = %v, %v, %v; want %v from the list at %v", rt, at, ok, next, next)
	}
	if _, _, ok := v.renewed("going"); ok {
		t.Error("a host whose Lease is gone still has one")
	}
}

// A host is judged unreachable only from a list of the Leases taken after its heartbeat went
// stale: a list from before cannot show a renewal that came since.
func TestStaleOnlyFromALaterList(t *testing.T) {
	ctx := context.Background()
	s := runtime.NewScheme()
	_ = v1.AddToScheme(s)
	h := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: "h"}}
	h.Status.Conditions = []metav1.Condition{{Type: v1.ConditionReachable, Status: metav1.ConditionTrue, Reason: "HeartbeatFresh", LastTransitionTime: metav1.Now()}}
	c := fake.NewClientBuilder().WithScheme(s).WithObjects(h).WithStatusSubresource(h).Build()
	now := time.Unix(10000, 0)
	grace := 40 * time.Second
	r := &GatewayHostReconciler{Client: c, Recorder: nopRecorder{}, GracePeriod: grace, Now: func() time.Time { return now },
		leases: &leaseView{hosts: c, period: 10 * time.Second, grace: grace}}
	r.startOnce.Do(func() { r.started = now.Add(-time.Hour) })
	renewed := metav1.NewMicroTime(now.Add(-50 * time.Second)) // stale since 10 s ago
	lease := []coordinationv1.Lease{{ObjectMeta: metav1.ObjectMeta{Name: "h"}, Spec: coordinationv1.LeaseSpec{RenewTime: &renewed}}}
	reachable := func() metav1.ConditionStatus {
		var got v1.GatewayHost
		if err := c.Get(ctx, client.ObjectKey{Name: "h"}, &got); err != nil {
			t.Fatal(err)
		}
		return meta.FindStatusCondition(got.Status.Conditions, v1.ConditionReachable).Status
	}

	r.leases.update(ctx, lease, now.Add(-15*time.Second)) // listed before it went stale
	res, err := r.Reconcile(ctx, reconcile.Request{NamespacedName: client.ObjectKey{Name: "h"}})
	if err != nil || res.RequeueAfter <= 0 {
		t.Fatalf("Reconcile = %+v, %v; want to look again after the next list", res, err)
	}
	if st := reachable(); st != metav1.ConditionTrue {
		t.Errorf("judged %s from a list taken before the heartbeat went stale", st)
	}
	r.leases.update(ctx, lease, now.Add(-5*time.Second)) // listed after
	if _, err := r.Reconcile(ctx, reconcile.Request{NamespacedName: client.ObjectKey{Name: "h"}}); err != nil {
		t.Fatal(err)
	}
	if st := reachable(); st != metav1.ConditionFalse {
		t.Errorf("still %s from a list taken after the heartbeat went stale", st)
	}
}

type nopRecorder struct{}

func (nopRecorder) Eventf(runtime.Object, runtime.Object, string, string, string, string, ...any) {}
func (nopRecorder) AnnotatedEventf(runtime.Object, runtime.Object, map[string]string, string, string, string, string, ...any) {
}
