package controllers_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// twoHostProfile creates hosts <name>-1 and <name>-2 with heart-beating simulated agents, a
// profile <name> on both, and waits until both hosts run it aligned. It returns the agents'
// stop functions.
func twoHostProfile(t *testing.T, name string) (stop1, stop2 func()) {
	t.Helper()
	h1, h2 := name+"-1", name+"-2"
	mustCreate(t, host(h1, map[string]string{"pool": name}))
	mustCreate(t, host(h2, map[string]string{"pool": name}))
	stop1 = simulatedAgentHeartbeats(t, h1)
	stop2 = simulatedAgentHeartbeats(t, h2)
	mustCreate(t, rel(name+"-r1", "1.0.0", shaA))
	p := profile(name, name+"-r1", map[string]string{"pool": name})
	all := intstr.FromString("100%")
	p.Spec.Rollout.MaxUnavailable = &all
	mustCreate(t, p)
	eventually(t, "instances on both hosts", func() (bool, string) {
		_, e1 := getInstance(v1.InstanceName(name, h1))
		_, e2 := getInstance(v1.InstanceName(name, h2))
		return e1 == nil && e2 == nil, fmt.Sprint(e1, e2)
	})
	simulatedAgentReports(t, v1.InstanceName(name, h1), true, "")
	simulatedAgentReports(t, v1.InstanceName(name, h2), true, "")
	eventually(t, "the profile to count 2 aligned", func() (bool, string) {
		p := getProfile(t, name)
		return p.Status.Aligned == 2, fmt.Sprintf("%+v", p.Status)
	})
	return stop1, stop2
}

func deleteHost(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	if err := c.Delete(ctx, host(name, nil)); err != nil {
		t.Fatal(err)
	}
	// Nothing holds a GatewayHost: it is gone at once.
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &v1.GatewayHost{}); !apierrors.IsNotFound(err) {
		t.Fatalf("GatewayHost %s still there after its deletion: %v", name, err)
	}
}

// eventNotes lists the notes of the events with reason on the object named regarding.
func eventNotes(t *testing.T, regarding, reason string) []string {
	t.Helper()
	var evs eventsv1.EventList
	if err := c.List(context.Background(), &evs); err != nil {
		t.Fatal(err)
	}
	var notes []string
	for _, e := range evs.Items {
		if e.Regarding.Name == regarding && e.Reason == reason {
			notes = append(notes, e.Note)
		}
	}
	return notes
}

func profileGone(name string) func() (bool, string) {
	return func() (bool, string) {
		err := c.Get(context.Background(), client.ObjectKey{Name: name}, &v1.GatewayProfile{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	}
}

// TestDeletedHostReleasesInstancesSimulatedAgents: deleting the GatewayHost of a machine that
// is gone releases its instance with an event saying why, leaves the other host's instance
// alone, lets the profile's deletion complete, and a host registered again under the same
// name starts with a new instance.
func TestDeletedHostReleasesInstancesSimulatedAgents(t *testing.T) {
	ctx := context.Background()
	_, stop2 := twoHostProfile(t, "hg")
	kept, err := getInstance("hg.hg-1")
	if err != nil {
		t.Fatal(err)
	}
	old, err := getInstance("hg.hg-2")
	if err != nil {
		t.Fatal(err)
	}

	stop2() // the machine is gone
	deleteHost(t, "hg-2")
	eventually(t, "hg.hg-2 to be released and gone", func() (bool, string) {
		gi, err := getInstance("hg.hg-2")
		return apierrors.IsNotFound(err), fmt.Sprintf("%v %v", err, gi.Finalizers)
	})
	eventually(t, "a HostGone event on the profile naming hg-2", func() (bool, string) {
		notes := eventNotes(t, "hg", "HostGone")
		for _, n := range notes {
			if strings.Contains(n, "GatewayHost hg-2 was deleted") && strings.Contains(n, "nothing can run there") {
				return true, ""
			}
		}
		return false, fmt.Sprint(notes)
	})
	if notes := eventNotes(t, "hg.hg-2", "HostGone"); len(notes) == 0 {
		t.Error("no HostGone event on the released instance")
	}
	gi, err := getInstance("hg.hg-1")
	if err != nil || gi.UID != kept.UID || !gi.DeletionTimestamp.IsZero() ||
		!controllerutil.ContainsFinalizer(gi, v1.FinalizerInstanceUnits) || !meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned) {
		t.Fatalf("the other host's instance was touched: %v %+v", err, gi)
	}
	eventually(t, "the profile to count one host", func() (bool, string) {
		p := getProfile(t, "hg")
		return p.Status.Desired == 1 && p.Status.Aligned == 1, fmt.Sprintf("%+v", p.Status)
	})

	// The machine comes back (or another takes its name): its agent registers it again, and it
	// gets a new instance with nothing of the old one's state.
	mustCreate(t, host("hg-2", map[string]string{"pool": "hg"}))
	simulatedAgentHeartbeats(t, "hg-2")
	eventually(t, "a new instance on hg-2", func() (bool, string) {
		gi, err := getInstance("hg.hg-2")
		return err == nil && gi.UID != old.UID, fmt.Sprint(err)
	})
	gi, _ = getInstance("hg.hg-2")
	if gi.Status.CurrentRelease != nil || len(gi.Status.Conditions) != 0 || !gi.DeletionTimestamp.IsZero() ||
		!controllerutil.ContainsFinalizer(gi, v1.FinalizerInstanceUnits) {
		t.Errorf("the re-registered host's instance does not start clean: %+v %+v", gi.ObjectMeta, gi.Status)
	}

	if err := c.Delete(ctx, getProfile(t, "hg")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"hg.hg-1", "hg.hg-2"} {
		eventually(t, name+" to be marked for deletion", func() (bool, string) {
			gi, err := getInstance(name)
			return err == nil && !gi.DeletionTimestamp.IsZero(), fmt.Sprint(err)
		})
		simulatedAgentRemovesUnit(t, name)
	}
	eventually(t, "the profile to be gone", profileGone("hg"))
}

// TestUnreachableHostHoldsProfileDeletionSimulatedAgents: a host that is only unreachable keeps
// its instance; the profile's deletion waits for it and says, on the profile, which host it
// waits for and how to let it go. Deleting that GatewayHost lets the deletion complete.
func TestUnreachableHostHoldsProfileDeletionSimulatedAgents(t *testing.T) {
	ctx := context.Background()
	_, stop2 := twoHostProfile(t, "ur")
	stop2() // the agent stops; the object stays
	eventually(t, "ur-2 to be Unreachable", func() (bool, string) {
		var h v1.GatewayHost
		_ = c.Get(ctx, client.ObjectKey{Name: "ur-2"}, &h)
		return meta.IsStatusConditionFalse(h.Status.Conditions, v1.ConditionReachable), fmt.Sprintf("%+v", h.Status.Conditions)
	})

	if err := c.Delete(ctx, getProfile(t, "ur")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ur.ur-1 to be marked for deletion", func() (bool, string) {
		gi, err := getInstance("ur.ur-1")
		return err == nil && !gi.DeletionTimestamp.IsZero(), fmt.Sprint(err)
	})
	simulatedAgentRemovesUnit(t, "ur.ur-1")
	eventually(t, "the profile to name ur-2 and the way out", func() (bool, string) {
		p := getProfile(t, "ur")
		r := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady)
		return r != nil && r.Status == "False" && r.Reason == "Terminating" &&
			strings.Contains(r.Message, "unreachable host(s)") && strings.Contains(r.Message, "ur-2") &&
			!strings.Contains(r.Message, "ur-1") &&
			strings.Contains(r.Message, "kubectl delete gatewayhost ur-2"), fmt.Sprintf("%+v", r)
	})
	eventually(t, "a WaitingForHosts event on the profile", func() (bool, string) {
		notes := eventNotes(t, "ur", "WaitingForHosts")
		return len(notes) > 0 && strings.Contains(notes[0], "ur-2"), fmt.Sprint(notes)
	})
	// The condition was written after the profile's last look at its instances: the
	// unreachable host's instance is still held, and so is the profile.
	gi, err := getInstance("ur.ur-2")
	if err != nil || gi.DeletionTimestamp.IsZero() || !controllerutil.ContainsFinalizer(gi, v1.FinalizerInstanceUnits) {
		t.Fatalf("an unreachable host's instance was let go: %v %+v", err, gi.ObjectMeta)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "ur"}, &v1.GatewayProfile{}); err != nil {
		t.Fatalf("the profile went away while an unreachable host still had its unit: %v", err)
	}

	deleteHost(t, "ur-2")
	eventually(t, "the profile to be gone", profileGone("ur"))
	if _, err := getInstance("ur.ur-2"); !apierrors.IsNotFound(err) {
		t.Errorf("ur.ur-2 outlived its profile: %v", err)
	}
}

// TestHostDeletedWhileManagerDownSimulatedAgents: a GatewayHost deleted while no controller
// manager runs has its instances released by the next one.
func TestHostDeletedWhileManagerDownSimulatedAgents(t *testing.T) {
	_, stop2 := twoHostProfile(t, "md")
	if err := stopManager(); err != nil {
		t.Fatal(err)
	}
	stop2()
	deleteHost(t, "md-2")
	if err := startManager(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "md.md-2 to be released and gone", func() (bool, string) {
		_, err := getInstance("md.md-2")
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	if gi, err := getInstance("md.md-1"); err != nil || !gi.DeletionTimestamp.IsZero() {
		t.Errorf("the other host's instance was touched: %v", err)
	}
}

// TestHostHeldByAnotherFinalizerSimulatedAgents: a GatewayHost whose deletion another party's
// finalizer holds is being decommissioned all the same: its instance is released and no new
// one is written for it.
func TestHostHeldByAnotherFinalizerSimulatedAgents(t *testing.T) {
	ctx := context.Background()
	_, stop2 := twoHostProfile(t, "hf")
	stop2()
	const hold = "example.com/inventory"
	edit := func(f func(*v1.GatewayHost)) {
		t.Helper()
		var h v1.GatewayHost
		if err := c.Get(ctx, client.ObjectKey{Name: "hf-2"}, &h); err != nil {
			t.Fatal(err)
		}
		base := h.DeepCopy()
		f(&h)
		if err := c.Patch(ctx, &h, client.MergeFrom(base)); err != nil {
			t.Fatal(err)
		}
	}
	edit(func(h *v1.GatewayHost) { controllerutil.AddFinalizer(h, hold) })
	t.Cleanup(func() { edit(func(h *v1.GatewayHost) { controllerutil.RemoveFinalizer(h, hold) }) })
	if err := c.Delete(ctx, host("hf-2", nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "hf.hf-2 to be released and gone", func() (bool, string) {
		_, err := getInstance("hf.hf-2")
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
	eventually(t, "the profile to count one host", func() (bool, string) {
		p := getProfile(t, "hf")
		return p.Status.Desired == 1, fmt.Sprintf("%+v", p.Status)
	})
	if _, err := getInstance("hf.hf-2"); !apierrors.IsNotFound(err) {
		t.Errorf("a new instance was written for a host being deleted: %v", err)
	}
}
