package microvm_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// TestVMRunsInItsOwnLimitedUnit: while a run is active its QEMU is in a transient unit's cgroup
// of its own, not in the agent's, with the unit's limits; after the run systemd has no such
// unit any more.
func TestVMRunsInItsOwnLimitedUnit(t *testing.T) {
	r, h := microvmguest.Start(t, microvm.Config{})
	done := make(chan microvm.Result)
	go func() {
		res, _ := r.Run(context.Background(), microvm.Request{Command: []string{"sleep", "600"}, TimeoutSeconds: 20})
		done <- res
	}()
	unit, pid := waitQEMU(t, h)
	if !strings.HasPrefix(unit, microvm.UnitPrefix) {
		t.Errorf("unit %s", unit)
	}

	// The limits systemd holds for the unit.
	memMax := strconv.Itoa((microvm.DefaultMemoryMiB + microvm.DefaultMemoryOverheadMiB) << 20)
	out, err := h.Systemctl(context.Background(), "show", unit, "-p",
		"MemoryMax,MemorySwapMax,TasksMax,CPUQuotaPerSecUSec,CPUWeight,User,NoNewPrivileges,PrivateNetwork,ProtectSystem")
	if err != nil {
		t.Fatalf("systemctl show: %v\n%s", err, out)
	}
	props := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, _ := strings.Cut(line, "=")
		props[k] = v
	}
	for k, want := range map[string]string{
		"MemoryMax": memMax, "MemorySwapMax": "0", "TasksMax": "64", "CPUQuotaPerSecUSec": "1s", "CPUWeight": "50",
		"User": strconv.Itoa(microvmguest.QEMUUser), "NoNewPrivileges": "yes", "PrivateNetwork": "yes", "ProtectSystem": "strict",
	} {
		if props[k] != want {
			t.Errorf("unit %s: %s=%q, want %q", unit, k, props[k], want)
		}
	}

	// QEMU's cgroup is the unit's, and the agent (this test process) is not in it.
	cgRoot, err := systemdhost.CgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	qemuCg := unifiedCgroup(t, h.ProcPath(pid, "cgroup"))
	selfCg := unifiedCgroup(t, "/proc/self/cgroup")
	if !strings.HasSuffix(qemuCg, "/system.slice/"+unit) || qemuCg == selfCg {
		t.Fatalf("QEMU's cgroup is %s (the agent's is %s), want the unit's own", qemuCg, selfCg)
	}
	procs := cgroupProcs(t, filepath.Join(cgRoot, qemuCg))
	if len(procs) != 1 || slices.Contains(procs, os.Getpid()) {
		t.Fatalf("processes in %s: %v, want QEMU alone (the agent is %d)", qemuCg, procs, os.Getpid())
	}
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", procs[0])); !strings.Contains(string(cmdline), "toolrun-") {
		t.Fatalf("the process in %s is not QEMU: %q", qemuCg, cmdline)
	}
	if slices.Contains(cgroupProcs(t, filepath.Join(cgRoot, selfCg)), procs[0]) {
		t.Fatalf("QEMU (%d) is in the agent's cgroup %s", procs[0], selfCg)
	}
	// The kernel enforces the limits where the unified hierarchy has the controllers; on a
	// host whose memory and pids controllers are bound to cgroup v1 it has none to enforce
	// them with, and only systemd's view above can be checked.
	controllers, err := os.ReadFile(filepath.Join(cgRoot, qemuCg, "cgroup.controllers"))
	if err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{"memory.max": memMax, "memory.swap.max": "0", "pids.max": "64", "cpu.max": "100000 100000"} {
		controller, _, _ := strings.Cut(file, ".")
		if !slices.Contains(strings.Fields(string(controllers)), controller) {
			t.Logf("no %s controller in the unified hierarchy here: %s not checked", controller, file)
			continue
		}
		got, err := os.ReadFile(filepath.Join(cgRoot, qemuCg, file))
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Errorf("%s of QEMU's cgroup: %q (%v), want %q", file, got, err, want)
		}
	}
	// Wherever the limit is enforced, the kernel's OOM killer picks QEMU before the agent.
	if adj, err := os.ReadFile(h.ProcPath(pid, "oom_score_adj")); err != nil || strings.TrimSpace(string(adj)) != "500" {
		t.Errorf("QEMU's oom_score_adj: %q (%v), want 500", adj, err)
	}

	res := <-done
	if res.Phase != microvm.TimedOut {
		t.Fatalf("phase %s, want TimedOut (%+v)", res.Phase, res)
	}
	assertUnitGone(t, h, unit)
	if _, err := os.Stat(filepath.Join(cgRoot, qemuCg)); !os.IsNotExist(err) {
		t.Errorf("QEMU's cgroup is still there after the run: %v", err)
	}
	// A run that ends normally leaves no unit either.
	res = run(t, r, microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Succeeded {
		t.Fatalf("true: %+v", res)
	}
	assertUnitGone(t, h, "")
}

// TestVMThatCannotStartFailsAtOnce: a QEMU that exits while starting ends the run with its own
// words, long before the run's timeout, and leaves no unit behind.
func TestVMThatCannotStartFailsAtOnce(t *testing.T) {
	for name, tc := range map[string]struct {
		cfg  microvm.Config
		want string
	}{
		// The test host has no /dev/kvm at all; QEMU's user could not open the host's either.
		"kvm without access": {microvm.Config{Accel: "kvm"}, "kvm"},
		"not a qemu":         {microvm.Config{QEMU: "/bin/false"}, "qemu exited before the guest started"},
	} {
		t.Run(name, func(t *testing.T) {
			r, h := microvmguest.Start(t, tc.cfg)
			done := make(chan microvm.Result, 1)
			go func() {
				res, err := r.Run(context.Background(), microvm.Request{Command: []string{"true"}, TimeoutSeconds: 60})
				if err != nil {
					res.Message += " / " + err.Error()
				}
				done <- res
			}()
			var res microvm.Result
			select {
			case res = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("the run is still waiting 20 s after QEMU failed to start (its timeout is 60 s)")
			}
			if res.Phase != microvm.Error || !strings.Contains(strings.ToLower(res.Message), tc.want) {
				t.Fatalf("%+v, want Error saying %q", res, tc.want)
			}
			t.Logf("failed after %d ms: %s", res.DurationMillis, res.Message)
			assertUnitGone(t, h, "")
		})
	}
}

// unifiedCgroup returns the "0::" cgroup of a /proc/<pid>/cgroup file.
func unifiedCgroup(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	t.Fatalf("%s has no unified cgroup: %s", file, b)
	return ""
}

func cgroupProcs(t *testing.T, dir string) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	return pids
}
