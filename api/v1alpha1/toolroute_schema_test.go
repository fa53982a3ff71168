package v1alpha1_test

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// TestToolRunSettingsValidation: the schema refuses a cluster route without an image, an
// unknown route, a slot count beyond one digit, and cluster resources without limits.
func TestToolRunSettingsValidation(t *testing.T) {
	p := func(name string, s v1.ToolRunSettings) *v1.GatewayProfile {
		g := profile(name)
		g.Spec.ToolRuns = &s
		return g
	}
	mustReject(t, p("tr-noimage", v1.ToolRunSettings{Route: v1.ToolRunRouteCluster}), "route Cluster needs an image")
	mustReject(t, p("tr-route", v1.ToolRunSettings{Route: "Elsewhere"}), "Unsupported value")
	mustReject(t, p("tr-slots", v1.ToolRunSettings{Image: "busybox", ClusterSlots: 10}), "clusterSlots")
	mustReject(t, p("tr-res", v1.ToolRunSettings{Image: "busybox", Resources: &corev1.ResourceRequirements{
		Limits: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1")}}}), "resources.limits.cpu and resources.limits.memory are required")
	mustCreate(t, p("tr-ok", v1.ToolRunSettings{Route: v1.ToolRunRouteCluster, Image: "busybox", ClusterSlots: 2}))
	mustCreate(t, p("tr-host", v1.ToolRunSettings{Route: v1.ToolRunRouteHost}))
}

func TestToolRunSlot(t *testing.T) {
	if got := v1.ToolRunSlot("core", "node-a", 3); got != "core.node-a.3" {
		t.Errorf("slot %q", got)
	}
	long := "h123456789012345678901234567890123456789012345678901234567890"
	if got := v1.ToolRunSlot("core", long, 0); got != "" {
		t.Errorf("a slot name over 63 characters: %q", got)
	}
	if got := v1.ToolRunSlot("core", "node-a", v1.MaxToolRunSlots); got != "" {
		t.Errorf("slot beyond the maximum: %q", got)
	}
}
