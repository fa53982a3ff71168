package controllers

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
