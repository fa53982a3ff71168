package agent_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// TestAgentReportsMicroVMAcceleration: with --microvm-accel=auto and the machine's real KVM
// device on its host (usable by group kvm), the agent reports TCG while its probe VM boots and
// then writes the probe's outcome to its GatewayHost: KVM because the probe booted, or TCG with
// why it did not (on this project's CI machine kind a guest hangs under KVM). Without
// /dev/kvm, the host says so.
func TestAgentReportsMicroVMAcceleration(t *testing.T) {
	kernel, _ := microvmguest.Files(t)
	ctx := context.Background()
	h := systemdhost.Start(t, systemdhost.Options{Name: "node-kvm"})
	microvmguest.AddKVMDevice(t, h)
	t.Cleanup(runAgent(t, h, "node-kvm", func(o *agent.Options) {
		o.MicroVM = agent.MicroVMOptions{Guest: filepath.Dir(kernel), WorkDir: microvmguest.WorkDir,
			Accel: "auto", KVMProbeTimeout: 8 * time.Second}
	}))
	var c v1.HostCapabilities
	probing := false
	eventually(t, "node-kvm to report the outcome of its KVM probe", func() (bool, string) {
		var gh v1.GatewayHost
		if err := cp.Client.Get(ctx, client.ObjectKey{Name: "node-kvm"}, &gh); err != nil {
			return false, err.Error()
		}
		c = gh.Status.Capabilities
		if strings.Contains(c.MicroVMAccelerationReason, "under way") {
			probing = true
			if c.MicroVMAcceleration != v1.AccelerationTCG {
				t.Fatalf("%+v while the probe runs, want TCG", c)
			}
		}
		return c.MicroVMAcceleration != "" && !strings.Contains(c.MicroVMAccelerationReason, "under way"), fmt.Sprintf("%+v", c)
	})
	t.Logf("capabilities: %+v (the probe was seen under way: %v)", c, probing)
	switch {
	case !c.MicroVM:
		t.Fatalf("%+v, want the microVM capability", c)
	case c.MicroVMAcceleration == v1.AccelerationKVM && strings.Contains(c.MicroVMAccelerationReason, "booted under KVM"):
	case c.MicroVMAcceleration == v1.AccelerationTCG && strings.Contains(c.MicroVMAccelerationReason, "the probe boot under KVM did not complete"):
	default:
		t.Fatalf("%+v, want KVM after a probe boot, or TCG with why the probe did not complete", c)
	}

	// A host without /dev/kvm reports why at once.
	startAgent(t, "node-nokvm", func(o *agent.Options) {
		o.MicroVM = agent.MicroVMOptions{Guest: filepath.Dir(kernel), WorkDir: microvmguest.WorkDir, Accel: "auto"}
	})
	eventually(t, "node-nokvm to report TCG", func() (bool, string) {
		var gh v1.GatewayHost
		if err := cp.Client.Get(ctx, client.ObjectKey{Name: "node-nokvm"}, &gh); err != nil {
			return false, err.Error()
		}
		c := gh.Status.Capabilities
		return c.MicroVM && c.MicroVMAcceleration == v1.AccelerationTCG && c.MicroVMAccelerationReason == "no /dev/kvm on the host", fmt.Sprintf("%+v", c)
	})
}
