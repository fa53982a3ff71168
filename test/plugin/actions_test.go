package plugin_test

import (
	"context"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func setRelease(t *testing.T, profile, rel string) {
	t.Helper()
	if out, err := kubectl(admin, "patch", "gwp", profile, "--type=merge", "-p", `{"spec":{"release":"`+rel+`"}}`); err != nil {
		t.Fatalf("patch: %v\n%s", err, out)
	}
}

func targets(t *testing.T, profile string) map[string]string {
	t.Helper()
	var list v1.GatewayInstanceList
	if err := c.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, gi := range list.Items {
		if gi.Spec.Profile == profile {
			got[gi.Spec.Host] = gi.Spec.Release.Name
		}
	}
	return got
}

// An operator promotes a paused canary and rolls back to where the rollout started, waiting
// each time for the controller, with nothing but kubectl gateway.
func TestPromoteThenRollback(t *testing.T) {
	one := intstr.FromInt32(1)
	mustCreate(t, host("roll-1", "roll"), host("roll-2", "roll"), host("roll-3", "roll"),
		release("roll-r1", "1.0.0"), release("roll-r2", "2.0.0"),
		profile("roll", "roll-r1", "roll", v1.RolloutStrategy{MaxUnavailable: &one, Canary: &v1.CanaryStep{Hosts: &one}}))
	ready(t, "roll")

	setRelease(t, "roll", "roll-r2")
	eventually(t, "canary pause", func() (bool, string) {
		gp := getProfile(t, "roll")
		return meta.IsStatusConditionTrue(gp.Status.Conditions, v1.ConditionPaused), "not paused"
	})
	if s := gateway(t, viewer, "status", "roll"); !strings.Contains(s, "kubectl gateway promote roll") {
		t.Errorf("status does not say how to promote a paused canary:\n%s", s)
	}
	out := gateway(t, operator, "promote", "roll", "--wait")
	if !strings.Contains(out, "promote handled") {
		t.Fatalf("promote --wait returned before the request was handled:\n%s", out)
	}
	if h := getProfile(t, "roll").Status.LastHandled; h == nil || h.Promote == "" {
		t.Fatalf("promote --wait returned but status.lastHandled.promote is empty: %+v", h)
	}
	ready(t, "roll")
	for h, r := range targets(t, "roll") {
		if r != "roll-r2" {
			t.Errorf("after promote %s targets %s", h, r)
		}
	}
	hist := gateway(t, viewer, "history", "roll")
	if !strings.Contains(hist, "roll-r1 (1.0.0)") || !strings.Contains(hist, "roll-r2 (2.0.0)") || !strings.Contains(hist, "Complete") {
		t.Errorf("history does not show the rollout from r1 to r2:\n%s", hist)
	}

	// Going back after a complete rollout is a rollout like any other: its canary pauses.
	out = gateway(t, operator, "rollback", "roll", "--wait")
	if !strings.Contains(out, "to roll-r1") || !strings.Contains(out, "kubectl gateway promote roll") {
		t.Fatalf("rollback --wait:\n%s", out)
	}
	gateway(t, operator, "promote", "roll", "--wait")
	ready(t, "roll")
	gp := getProfile(t, "roll")
	if gp.Spec.Release != "roll-r1" || !meta.IsStatusConditionTrue(gp.Status.Conditions, v1.ConditionReady) {
		t.Fatalf("rollback --wait returned with release %s, conditions %+v", gp.Spec.Release, gp.Status.Conditions)
	}
	for h, r := range targets(t, "roll") {
		if r != "roll-r1" {
			t.Errorf("after rollback %s targets %s", h, r)
		}
	}
	if out, err := kubectl(operator, "gateway", "rollback", "roll", "--to", "no-such-release"); err == nil || !strings.Contains(out, "not found") {
		t.Errorf("rollback to a missing release: %v\n%s", err, out)
	}
}

// A halted rollout is resumed and then aborted; --wait returns once the controller recorded
// each token.
func TestResumeAndAbort(t *testing.T) {
	failing.Store("halt-bad", true)
	t.Cleanup(func() { failing.Delete("halt-bad") })
	one := intstr.FromInt32(1)
	mustCreate(t, host("halt-1", "halt"), host("halt-2", "halt"),
		release("halt-good", "1.0.0"), release("halt-bad", "2.0.0"),
		profile("halt", "halt-good", "halt", v1.RolloutStrategy{MaxUnavailable: &one}))
	ready(t, "halt")
	setRelease(t, "halt", "halt-bad")
	halted := func() (bool, string) {
		r := getProfile(t, "halt").Status.Rollout
		if r == nil {
			return false, "no rollout"
		}
		return r.Phase == v1.RolloutHalted, string(r.Phase)
	}
	eventually(t, "halt", halted)
	if s := gateway(t, viewer, "status", "halt", "-o", "wide"); !strings.Contains(s, "Halted") || !strings.Contains(s, "ProofFailed") {
		t.Errorf("status does not show the halt and its reason:\n%s", s)
	}
	before := getProfile(t, "halt").Status.LastHandled
	if out := gateway(t, operator, "resume", "halt", "--wait"); !strings.Contains(out, "resume handled") {
		t.Fatalf("resume --wait:\n%s", out)
	}
	after := getProfile(t, "halt").Status.LastHandled
	if after == nil || after.Resume == "" || (before != nil && before.Resume == after.Resume) {
		t.Fatalf("resume --wait returned but status.lastHandled did not change: %+v -> %+v", before, after)
	}
	eventually(t, "halt again", halted)
	if out := gateway(t, operator, "abort", "halt", "--wait"); !strings.Contains(out, "abort handled") {
		t.Fatalf("abort --wait:\n%s", out)
	}
	eventually(t, "aborted", func() (bool, string) {
		r := getProfile(t, "halt").Status.Rollout
		return r != nil && r.Phase == v1.RolloutAborted, "not aborted"
	})
	for h, r := range map[string]string{"halt-1": "halt-good", "halt-2": "halt-good"} {
		eventually(t, h+" back", func() (bool, string) {
			var gi v1.GatewayInstance
			if err := c.Get(context.Background(), client.ObjectKey{Name: v1.InstanceName("halt", h)}, &gi); err != nil {
				return false, err.Error()
			}
			return gi.Spec.Release.Name == r, gi.Spec.Release.Name
		})
	}
}

// A paused profile does not move a host when its release changes, until it is unpaused.
func TestPauseUnpause(t *testing.T) {
	mustCreate(t, host("pause-1", "pause"), release("pause-r1", "1.0.0"), release("pause-r2", "2.0.0"),
		profile("pause", "pause-r1", "pause", v1.RolloutStrategy{}))
	ready(t, "pause")
	gateway(t, operator, "pause", "pause", "--wait")
	gp := getProfile(t, "pause")
	if !gp.Spec.Rollout.Paused || gp.Status.ObservedGeneration != gp.Generation {
		t.Fatalf("pause --wait returned with paused=%v observed %d of %d", gp.Spec.Rollout.Paused, gp.Status.ObservedGeneration, gp.Generation)
	}
	setRelease(t, "pause", "pause-r2")
	eventually(t, "paused rollout", func() (bool, string) {
		gp := getProfile(t, "pause")
		return meta.IsStatusConditionTrue(gp.Status.Conditions, v1.ConditionPaused), "not paused"
	})
	if got := targets(t, "pause")["pause-1"]; got != "pause-r1" {
		t.Fatalf("a paused profile moved pause-1 to %s", got)
	}
	gateway(t, operator, "unpause", "pause", "--wait")
	if getProfile(t, "pause").Spec.Rollout.Paused {
		t.Fatal("unpause left spec.rollout.paused set")
	}
	ready(t, "pause")
	if got := targets(t, "pause")["pause-1"]; got != "pause-r2" {
		t.Fatalf("after unpause pause-1 targets %s", got)
	}
}
