package controllers_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// TestResourcesReachInstancesSimulatedAgents: a profile's resource caps (or their defaults)
// reach every instance; a changed cap changes the instances' config hash, so it rolls out like
// any setting; a cap out of bounds is refused by the API server and reaches no instance.
func TestResourcesReachInstancesSimulatedAgents(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, host("rs-1", map[string]string{"pool": "rs"}))
	simulatedAgentHeartbeats(t, "rs-1")
	mustCreate(t, rel("rs-r1", "1.0.0", shaA))
	capped := profile("rs", "rs-r1", map[string]string{"pool": "rs"})
	mem := resource.MustParse("512Mi")
	capped.Spec.Resources = v1.GatewayResources{MemoryMax: &mem, TasksMax: 128}
	all := intstr.FromString("100%")
	capped.Spec.Rollout.MaxUnavailable = &all
	mustCreate(t, capped)
	plain := profile("rs-plain", "rs-r1", map[string]string{"pool": "rs"})
	mustCreate(t, plain)

	caps := func(name string, memory string, tasks int32) func() (bool, string) {
		return func() (bool, string) {
			gi, err := getInstance(name)
			if err != nil {
				return false, err.Error()
			}
			r := gi.Spec.Resources
			return r.MemoryMax != nil && r.MemoryMax.Cmp(resource.MustParse(memory)) == 0 && r.TasksMax == tasks,
				fmt.Sprintf("%+v", r)
		}
	}
	eventually(t, "rs.rs-1 to carry the profile's caps", caps("rs.rs-1", "512Mi", 128))
	eventually(t, "rs-plain.rs-1 to carry the default caps", caps("rs-plain.rs-1", v1.DefaultGatewayMemoryMax, v1.DefaultGatewayTasksMax))
	gi, _ := getInstance("rs.rs-1")
	firstHash := gi.Spec.ConfigHash
	simulatedAgentReports(t, "rs.rs-1", true, "")

	setTasks := func(n int32) error {
		return retry.RetryOnConflict(retry.DefaultRetry, func() error {
			p := getProfile(t, "rs")
			p.Spec.Resources.TasksMax = n
			return c.Update(ctx, p)
		})
	}
	if err := setTasks(256); err != nil {
		t.Fatal(err)
	}
	eventually(t, "rs.rs-1 to carry tasksMax 256 under a new config hash", func() (bool, string) {
		gi, err := getInstance("rs.rs-1")
		if err != nil {
			return false, err.Error()
		}
		return gi.Spec.Resources.TasksMax == 256 && gi.Spec.ConfigHash != firstHash, fmt.Sprintf("%+v %s", gi.Spec.Resources, gi.Spec.ConfigHash)
	})

	err := setTasks(4)
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec.resources.tasksMax") ||
		!strings.Contains(err.Error(), "greater than or equal to 16") {
		t.Fatalf("setting tasksMax 4: %v, want an Invalid error naming spec.resources.tasksMax", err)
	}
	if gi, _ := getInstance("rs.rs-1"); gi.Spec.Resources.TasksMax != 256 {
		t.Errorf("a refused cap reached the instance: %+v", gi.Spec.Resources)
	}
	for _, name := range []string{"rs", "rs-plain"} {
		if err := c.Delete(ctx, getProfile(t, name)); err != nil {
			t.Fatal(err)
		}
	}
	simulatedAgentRemovesUnitWhenDeleting(t, "rs.rs-1", "rs-plain.rs-1")
}

// simulatedAgentRemovesUnitWhenDeleting waits for each instance to be marked for deletion and
// drops its finalizer, as the host's agent would.
func simulatedAgentRemovesUnitWhenDeleting(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		eventually(t, name+" to be marked for deletion", func() (bool, string) {
			gi, err := getInstance(name)
			return err == nil && !gi.DeletionTimestamp.IsZero(), fmt.Sprint(err)
		})
		simulatedAgentRemovesUnit(t, name)
	}
}
