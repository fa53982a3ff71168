package controllers_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

var (
	shaA = strings.Repeat("a", 64)
	shaB = strings.Repeat("b", 64)
)

func getInstance(name string) (*v1.GatewayInstance, error) {
	var gi v1.GatewayInstance
	err := c.Get(context.Background(), client.ObjectKey{Name: name}, &gi)
	return &gi, err
}

func getProfile(t *testing.T, name string) *v1.GatewayProfile {
	t.Helper()
	var p v1.GatewayProfile
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &p); err != nil {
		t.Fatal(err)
	}
	return &p
}

// TestProfileLifecycleSimulatedAgents drives one profile through its life: instances appear on
// the selected hosts with everything an agent needs, counts follow the (simulated) agents'
// reports, a release change updates every instance, a host that stops matching loses its
// instance, and deleting the profile waits for every host to remove its unit.
func TestProfileLifecycleSimulatedAgents(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, host("lc-1", map[string]string{"pool": "lc"}))
	mustCreate(t, host("lc-2", map[string]string{"pool": "lc"}))
	mustCreate(t, host("lc-3", map[string]string{"pool": "other"}))
	simulatedAgentHeartbeats(t, "lc-1", "lc-2", "lc-3")
	mustCreate(t, rel("lc-r1", "1.0.0", shaA))
	mustCreate(t, rel("lc-r2", "2.0.0", shaB))
	p := profile("lc", "lc-r1", map[string]string{"pool": "lc"})
	p.Spec.Env = []v1.EnvVar{{Name: "TZ", Value: "UTC"}}
	p.Spec.EgressAllowlist = []v1.EgressRule{"10.0.0.0/8"}
	p.Spec.DeniedTools = []string{"shell"}
	all := intstr.FromString("100%") // pacing is tested in the rollout tests
	p.Spec.Rollout.MaxUnavailable = &all
	mustCreate(t, p)

	eventually(t, "instances on lc-1 and lc-2", func() (bool, string) {
		_, e1 := getInstance("lc.lc-1")
		_, e2 := getInstance("lc.lc-2")
		_, e3 := getInstance("lc.lc-3")
		return e1 == nil && e2 == nil && apierrors.IsNotFound(e3), fmt.Sprint(e1, e2, e3)
	})
	gi, _ := getInstance("lc.lc-1")
	if gi.Spec.Release.SHA256 != shaA || gi.Spec.Release.URL == "" || gi.Spec.Release.Label != "1.0.0" ||
		gi.Spec.Profile != "lc" || gi.Spec.Host != "lc-1" || gi.Spec.ConfigHash == "" ||
		len(gi.Spec.Env) != 1 || len(gi.Spec.EgressAllowlist) != 1 || len(gi.Spec.DeniedTools) != 1 ||
		gi.Spec.Isolation != v1.IsolationProduction || gi.Spec.Mode != v1.EntrypointCLI {
		t.Errorf("instance spec lacks what the agent needs: %+v", gi.Spec)
	}
	if gi.Labels[v1.LabelHost] != "lc-1" || gi.Labels[v1.LabelProfile] != "lc" || len(gi.OwnerReferences) != 1 ||
		len(gi.Finalizers) != 1 || gi.Finalizers[0] != v1.FinalizerInstanceUnits {
		t.Errorf("instance metadata: labels %v owners %v finalizers %v", gi.Labels, gi.OwnerReferences, gi.Finalizers)
	}
	firstHash := gi.Spec.ConfigHash

	eventually(t, "the profile to count 2 desired, 0 aligned", func() (bool, string) {
		p := getProfile(t, "lc")
		return p.Status.Desired == 2 && p.Status.Updated == 2 && p.Status.Aligned == 0 &&
			meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionProgressing), fmt.Sprintf("%+v", p.Status)
	})
	simulatedAgentReports(t, "lc.lc-1", true, "")
	simulatedAgentReports(t, "lc.lc-2", true, "")
	eventually(t, "the profile to be Ready", func() (bool, string) {
		p := getProfile(t, "lc")
		return p.Status.Aligned == 2 && meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReady) &&
				p.Status.CurrentRelease != nil && p.Status.CurrentRelease.Label == "1.0.0" && p.Status.ObservedGeneration == p.Generation,
			fmt.Sprintf("%+v", p.Status)
	})

	// A new release reaches every host.
	setRelease(t, "lc", "lc-r2", nil)
	eventually(t, "instances to ask for 2.0.0", func() (bool, string) {
		a, _ := getInstance("lc.lc-1")
		b, _ := getInstance("lc.lc-2")
		return a.Spec.Release.SHA256 == shaB && b.Spec.Release.SHA256 == shaB && a.Spec.ConfigHash != firstHash, a.Spec.Release.Label
	})
	eventually(t, "the profile to count 0 aligned on the new release", func() (bool, string) {
		p := getProfile(t, "lc")
		return p.Status.Updated == 2 && p.Status.Aligned == 0 && p.Status.TargetRelease.Label == "2.0.0", fmt.Sprintf("%+v", p.Status)
	})
	simulatedAgentReports(t, "lc.lc-1", true, "")
	simulatedAgentReports(t, "lc.lc-2", false, "ProofFailed")
	eventually(t, "a Degraded condition naming lc-2", func() (bool, string) {
		p := getProfile(t, "lc")
		d := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionDegraded)
		return p.Status.Degraded == 1 && p.Status.Aligned == 1 && d != nil && d.Status == metav1.ConditionTrue &&
			strings.Contains(d.Message, "lc-2"), fmt.Sprintf("%+v", p.Status)
	})

	// lc-2 stops matching: its instance is deleted; the simulated agent removes the unit.
	// The heartbeats write this host too: retry on a conflict, as any client would.
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var h v1.GatewayHost
		if err := c.Get(ctx, client.ObjectKey{Name: "lc-2"}, &h); err != nil {
			return err
		}
		h.Labels = map[string]string{"pool": "elsewhere"}
		return c.Update(ctx, &h)
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "lc.lc-2 to be marked for deletion", func() (bool, string) {
		gi, err := getInstance("lc.lc-2")
		return err == nil && !gi.DeletionTimestamp.IsZero(), fmt.Sprint(err)
	})
	simulatedAgentRemovesUnit(t, "lc.lc-2")
	eventually(t, "the profile to count one host", func() (bool, string) {
		p := getProfile(t, "lc")
		_, err := getInstance("lc.lc-2")
		return p.Status.Desired == 1 && p.Status.Degraded == 0 && apierrors.IsNotFound(err), fmt.Sprintf("%+v", p.Status)
	})

	// Deleting the profile removes its instances, and waits for the hosts.
	if err := c.Delete(ctx, getProfile(t, "lc")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "lc.lc-1 to be marked for deletion", func() (bool, string) {
		gi, err := getInstance("lc.lc-1")
		return err == nil && !gi.DeletionTimestamp.IsZero(), fmt.Sprint(err)
	})
	if err := c.Get(ctx, client.ObjectKey{Name: "lc"}, &v1.GatewayProfile{}); err != nil {
		t.Fatalf("the profile went away before its host removed the unit: %v", err)
	}
	simulatedAgentRemovesUnit(t, "lc.lc-1")
	eventually(t, "the profile to be gone", func() (bool, string) {
		err := c.Get(ctx, client.ObjectKey{Name: "lc"}, &v1.GatewayProfile{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})

	var evs eventsv1.EventList
	if err := c.List(ctx, &evs); err != nil {
		t.Fatal(err)
	}
	reasons := map[string]bool{}
	for _, e := range evs.Items {
		if e.Regarding.Name == "lc" {
			reasons[e.Reason] = true
		}
	}
	for _, r := range []string{"InstanceCreated", "InstanceUpdated", "InstanceDeleted"} {
		if !reasons[r] {
			t.Errorf("no %s event on the profile (got %v)", r, reasons)
		}
	}
}

// TestMissingReleaseTouchesNothing: a profile naming a missing release says so and creates
// nothing.
func TestMissingReleaseTouchesNothing(t *testing.T) {
	mustCreate(t, host("mr-1", map[string]string{"pool": "mr"}))
	mustCreate(t, profile("mr", "does-not-exist", map[string]string{"pool": "mr"}))
	eventually(t, "ReleaseNotFound", func() (bool, string) {
		p := getProfile(t, "mr")
		r := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady)
		return r != nil && r.Reason == "ReleaseNotFound" && strings.Contains(r.Message, "does-not-exist"), fmt.Sprintf("%+v", p.Status)
	})
	if _, err := getInstance("mr.mr-1"); !apierrors.IsNotFound(err) {
		t.Errorf("an instance was created for a missing release: %v", err)
	}
}

// TestReleaseInUseCannotDisappear: deleting a Release a profile uses waits, and says which
// profiles hold it.
func TestReleaseInUseCannotDisappear(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, rel("iu-r1", "1.0.0", shaA))
	mustCreate(t, profile("iu", "iu-r1", map[string]string{"pool": "none"}))
	eventually(t, "the release to be Ready and list its profile", func() (bool, string) {
		var r v1.Release
		_ = c.Get(ctx, client.ObjectKey{Name: "iu-r1"}, &r)
		return meta.IsStatusConditionTrue(r.Status.Conditions, v1.ConditionReady) && len(r.Status.Profiles) == 1 &&
			len(r.Finalizers) == 1, fmt.Sprintf("%+v %v", r.Status, r.Finalizers)
	})
	var r v1.Release
	_ = c.Get(ctx, client.ObjectKey{Name: "iu-r1"}, &r)
	if err := c.Delete(ctx, &r); err != nil {
		t.Fatal(err)
	}
	eventually(t, "an InUse condition naming the profile", func() (bool, string) {
		_ = c.Get(ctx, client.ObjectKey{Name: "iu-r1"}, &r)
		cond := meta.FindStatusCondition(r.Status.Conditions, v1.ConditionReady)
		return cond != nil && cond.Reason == "InUse" && strings.Contains(cond.Message, "iu"), fmt.Sprintf("%+v", r.Status)
	})
	if err := c.Delete(ctx, getProfile(t, "iu")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the release to be gone once unused", func() (bool, string) {
		err := c.Get(ctx, client.ObjectKey{Name: "iu-r1"}, &r)
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}

// TestStaleHeartbeatMarksUnreachable: a host whose heartbeat is older than the grace period
// becomes Unreachable, and Reachable again when it beats: by renewing its Lease, and, as an
// agent that predates Leases does, in the GatewayHost's status.
func TestStaleHeartbeatMarksUnreachable(t *testing.T) {
	t.Run("lease", func(t *testing.T) {
		testStaleHeartbeat(t, "hb-lease", func(h *v1.GatewayHost) {
			if err := renewLease(context.Background(), h.Name, time.Now()); err != nil {
				t.Fatal(err)
			}
		})
	})
	t.Run("status", func(t *testing.T) {
		testStaleHeartbeat(t, "hb-1", func(h *v1.GatewayHost) {
			base := h.DeepCopy()
			now := metav1.Now()
			h.Status.LastHeartbeatTime = &now
			if err := c.Status().Patch(context.Background(), h, client.MergeFrom(base)); err != nil {
				t.Fatal(err)
			}
		})
	})
}

func testStaleHeartbeat(t *testing.T, name string, beatOnce func(*v1.GatewayHost)) {
	ctx := context.Background()
	h := host(name, nil)
	mustCreate(t, h)
	beat := func() { beatOnce(h) }
	reachable := func(want metav1.ConditionStatus) func() (bool, string) {
		return func() (bool, string) {
			_ = c.Get(ctx, client.ObjectKeyFromObject(h), h)
			cond := meta.FindStatusCondition(h.Status.Conditions, v1.ConditionReachable)
			return cond != nil && cond.Status == want, fmt.Sprintf("%+v", cond)
		}
	}
	beat()
	eventually(t, "Reachable", reachable(metav1.ConditionTrue))
	eventually(t, "Unreachable after the grace period", reachable(metav1.ConditionFalse))
	eventually(t, "an Unreachable event for the stale heartbeat", func() (bool, string) {
		notes := eventNotes(t, name, "Unreachable")
		for _, n := range notes {
			if strings.Contains(n, "no heartbeat since") {
				return true, ""
			}
		}
		return false, fmt.Sprint(notes)
	})
	beat()
	eventually(t, "Reachable again", reachable(metav1.ConditionTrue))
}
