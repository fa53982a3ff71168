package microvm_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// testProbeTimeout keeps a probe that hangs under KVM short; a guest that works under KVM
// boots in well under a second.
const testProbeTimeout = 8 * time.Second

// TestAutoAccelProbesRealKVM gives a test host the machine's real /dev/kvm, usable by QEMU's
// user through group kvm, and lets acceleration auto decide: VMs use TCG while the probe runs,
// then either KVM because the probe VM booted, or TCG with the reason it did not (on this
// project's CI machine kind /dev/kvm exists but a guest hangs under it). A tool run works
// under whatever was chosen.
func TestAutoAccelProbesRealKVM(t *testing.T) {
	microvmguest.Files(t)
	h := systemdhost.Start(t, systemdhost.Options{})
	microvmguest.AddQEMUUser(t, h)
	microvmguest.AddKVMDevice(t, h)
	r := microvmguest.RunnerOn(t, h, microvm.Config{Accel: microvm.AccelAuto, KVMProbeTimeout: testProbeTimeout})

	if a := r.Acceleration(); a.Accel != microvm.AccelTCG || a.Final || !strings.Contains(a.Reason, "under way") {
		t.Fatalf("before the probe: %+v, want TCG while a probe is under way", a)
	}
	// A tool run while the probe is under way works (under whatever mode it started with).
	during := make(chan microvm.Result, 1)
	go func() {
		res, err := r.Run(context.Background(), microvm.Request{Command: []string{"echo", "during the probe"}, TimeoutSeconds: 30})
		if err != nil {
			res.Message += " / " + err.Error()
		}
		during <- res
	}()
	a := r.ProbeAccel(context.Background())
	t.Logf("acceleration: %+v", a)
	if res := <-during; res.Phase != microvm.Succeeded || string(res.Stdout) != "during the probe\n" {
		t.Fatalf("a run during the probe: %+v", res)
	}
	switch {
	case !a.Final:
		t.Fatalf("after the probe: %+v, want a final choice", a)
	case a.Accel == microvm.AccelKVM:
		if !strings.Contains(a.Reason, "booted under KVM") {
			t.Fatalf("KVM because %q, want the probe's success", a.Reason)
		}
	case a.Accel == microvm.AccelTCG:
		if !strings.Contains(a.Reason, "the probe boot under KVM did not complete") {
			t.Fatalf("TCG because %q, want why the probe boot under KVM did not complete", a.Reason)
		}
	default:
		t.Fatalf("acceleration %+v", a)
	}
	if r.Accel() != a.Accel || strings.Contains(r.KernelArgs(), "tsc_early_khz") != (a.Accel == microvm.AccelTCG) {
		t.Fatalf("the runner uses %s with kernel arguments %q after choosing %+v", r.Accel(), r.KernelArgs(), a)
	}
	// The probe's VM is gone, and a tool run works under the choice.
	assertUnitGone(t, h, "")
	res := run(t, r, microvm.Request{Command: []string{"echo", "after the probe"}, TimeoutSeconds: 30})
	if res.Phase != microvm.Succeeded || string(res.Stdout) != "after the probe\n" {
		t.Fatalf("a run under %s: %+v", a.Accel, res)
	}
	assertUnitGone(t, h, "")
	if again := r.ProbeAccel(context.Background()); again != a {
		t.Fatalf("a second ProbeAccel: %+v, want the first outcome %+v", again, a)
	}
}

// TestAutoAccelWithoutKVMDeviceNeedsNoProbe: on a host root without /dev/kvm, acceleration auto
// is TCG from the start, says so, and boots nothing to find out (the QEMU here cannot boot:
// a probe would end in its failure instead).
func TestAutoAccelWithoutKVMDeviceNeedsNoProbe(t *testing.T) {
	r, h := microvmguest.Start(t, microvm.Config{Accel: microvm.AccelAuto, QEMU: "/bin/false", KVMProbeTimeout: testProbeTimeout})
	want := microvm.Acceleration{Accel: microvm.AccelTCG, Reason: "no /dev/kvm on the host", Final: true}
	if a := r.Acceleration(); a != want {
		t.Fatalf("before ProbeAccel: %+v, want %+v", a, want)
	}
	if a := r.ProbeAccel(context.Background()); a != want {
		t.Fatalf("ProbeAccel: %+v, want %+v", a, want)
	}
	assertUnitGone(t, h, "")
}

// TestForcedAccelNeverProbes: tcg and kvm are taken as configured, whatever the host has.
func TestForcedAccelNeverProbes(t *testing.T) {
	microvmguest.Files(t)
	h := systemdhost.Start(t, systemdhost.Options{})
	microvmguest.AddQEMUUser(t, h)
	microvmguest.AddKVMDevice(t, h)
	for _, accel := range []string{microvm.AccelTCG, microvm.AccelKVM} {
		r := microvmguest.RunnerOn(t, h, microvm.Config{Accel: accel, QEMU: "/bin/false", KVMProbeTimeout: testProbeTimeout})
		want := microvm.Acceleration{Accel: accel, Reason: "acceleration " + accel + " is configured", Final: true}
		if a := r.ProbeAccel(context.Background()); a != want {
			t.Errorf("%s: %+v, want %+v", accel, a, want)
		}
	}
	assertUnitGone(t, h, "")
}
