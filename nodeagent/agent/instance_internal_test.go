package agent

import (
	"context"
	"math"
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// TestLimitsConvertsCaps: quantities become bytes without wrapping around, unset stays zero
// (the renderer's default).
func TestLimitsConvertsCaps(t *testing.T) {
	q := func(s string) *resource.Quantity { v := resource.MustParse(s); return &v }
	for _, tc := range []struct {
		name      string
		in        v1.GatewayResources
		mem, task int64
	}{
		{"unset", v1.GatewayResources{}, 0, 0},
		{"binary", v1.GatewayResources{MemoryMax: q("256Mi"), TasksMax: 64}, 256 << 20, 64},
		{"decimal", v1.GatewayResources{MemoryMax: q("1G")}, 1e9, 0},
		{"plain bytes", v1.GatewayResources{MemoryMax: q("1073741824")}, 1 << 30, 0},
		{"fraction of a byte rounds up", v1.GatewayResources{MemoryMax: q("100m")}, 1, 0},
		{"beyond int64", v1.GatewayResources{MemoryMax: q("1e30")}, math.MaxInt64, 0},
		{"beyond int64, negative", v1.GatewayResources{MemoryMax: q("-1e30")}, math.MinInt64, 0},
		{"negative", v1.GatewayResources{MemoryMax: q("-1Gi"), TasksMax: -1}, -1 << 30, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, tasks := limits(tc.in)
			if mem != tc.mem || tasks != tc.task {
				t.Errorf("limits(%+v) = %d, %d; want %d, %d", tc.in, mem, tasks, tc.mem, tc.task)
			}
		})
	}
}

// A held agent (another heart-beats under its identity) touches nothing: not the API server
// (no client here), not the host (no applier).
func TestHeldAgentAppliesNothing(t *testing.T) {
	r := &InstanceReconciler{Host: "twin", Hold: func() bool { return true }}
	res, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: client.ObjectKey{Name: "core.twin"}})
	if err != nil || res.RequeueAfter != holdRetry {
		t.Errorf("held: %+v, %v; want a look again after %s", res, err, holdRetry)
	}
}
