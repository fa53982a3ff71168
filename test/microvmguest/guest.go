// Package microvmguest gives tests a real microVM runner: QEMU from the host (hack/host-deps.sh)
// and the guest kernel + initramfs of hack/microvm-guest.sh, whose folder `make test` passes in
// GATEWAY_MICROVM_GUEST, started by a real systemd (test/systemdhost) as the agent does.
package microvmguest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/go-logr/logr/testr"
	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// QEMUUser and QEMUGroup are the first of the unprivileged ids tests run QEMU as; VM i of
// the QEMUUsers that may exist at once runs as QEMUUser+i and QEMUGroup+i.
const QEMUUser, QEMUGroup = 64531, 64531

// QEMUUsers is how many VMs may exist at once in a test runner: at most 4 on a shared machine.
const QEMUUsers = 4

// IDs are the users a test runner's VMs run as.
func IDs() []microvm.ID {
	ids := make([]microvm.ID, QEMUUsers)
	for i := range ids {
		ids[i] = microvm.ID{UID: uint32(QEMUUser + i), GID: uint32(QEMUGroup + i)}
	}
	return ids
}

// Files returns the guest kernel and initramfs, skipping the test when they or QEMU are not
// available (and failing it instead when GATEWAY_TEST_REQUIRE_ALL is set).
func Files(t testing.TB) (kernel, initramfs string) {
	t.Helper()
	missing := func(why string) {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" {
			t.Fatalf("%s, and GATEWAY_TEST_REQUIRE_ALL is set", why)
		}
		t.Skip(why + "; run make test")
	}
	if os.Geteuid() != 0 {
		missing("microVM tests need root (QEMU is started as another user)")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing("qemu-system-x86_64 is not installed (hack/host-deps.sh)")
	}
	dir := os.Getenv("GATEWAY_MICROVM_GUEST")
	if dir == "" {
		missing("GATEWAY_MICROVM_GUEST is not set (hack/microvm-guest.sh)")
	}
	return filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initramfs.cpio.gz")
}

// WorkDir is the folder, inside a test host, that holds the runs' folders: on the host's root
// folder itself (not a tmpfs of the sandbox), so the test reaches it under the host's Root.
const WorkDir = "/var/lib/gwvm"

// AddQEMUUser adds the users of IDs to a test host's passwd and group, as "gwvm_<i>".
func AddQEMUUser(t testing.TB, h *systemdhost.Host) {
	t.Helper()
	var passwd, group string
	for i, id := range IDs() {
		passwd += fmt.Sprintf("gwvm_%d:x:%d:%d::/nonexistent:/usr/sbin/nologin\n", i, id.UID, id.GID)
		group += fmt.Sprintf("gwvm_%d:x:%d:\n", i, id.GID)
	}
	for file, line := range map[string]string{"etc/passwd": passwd, "etc/group": group} {
		f, err := os.OpenFile(filepath.Join(h.Root, file), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteString(line)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// Runner returns a runner under TCG (the same on every CI machine) on a fresh systemd host,
// with cfg's non-zero fields taking precedence over the test defaults.
func Runner(t testing.TB, cfg microvm.Config) *microvm.Runner {
	t.Helper()
	r, _ := Start(t, cfg)
	return r
}

// Start boots a systemd host (torn down by t.Cleanup) and returns a runner whose QEMUs run
// there, each in its own transient unit, with cfg's non-zero fields taking precedence over the
// test defaults.
func Start(t testing.TB, cfg microvm.Config) (*microvm.Runner, *systemdhost.Host) {
	t.Helper()
	Files(t)
	h := systemdhost.Start(t, systemdhost.Options{})
	AddQEMUUser(t, h)
	return RunnerOn(t, h, cfg), h
}

// RunnerOn returns a runner whose QEMUs run on h, a host AddQEMUUser prepared, with cfg's
// non-zero fields taking precedence over the test defaults.
func RunnerOn(t testing.TB, h *systemdhost.Host, cfg microvm.Config) *microvm.Runner {
	t.Helper()
	kernel, initramfs := Files(t)
	if cfg.Systemd == nil {
		cfg.Systemd = h.Dial(t)
	}
	cfg.Root = h.Root
	if cfg.Kernel == "" {
		cfg.Kernel, cfg.Initramfs = kernel, initramfs
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = WorkDir
	}
	if cfg.UID == 0 && len(cfg.IDs) == 0 {
		cfg.IDs = IDs()
		if cfg.MaxConcurrent == 0 {
			// The last user is the KVM probe VM's own, as the agent sets it up.
			cfg.MaxConcurrent = QEMUUsers - 1
		}
	}
	if cfg.Accel == "" {
		cfg.Accel = "tcg"
	}
	if cfg.Log.GetSink() == nil {
		cfg.Log = testr.NewWithInterface(t, testr.Options{})
	}
	r, err := microvm.NewRunner(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// KVMGroup is the group AddKVMDevice gives /dev/kvm, as Debian's udev rules give it `kvm`.
const KVMGroup = 64530

// AddKVMDevice gives a test host the machine's real KVM device (10:232) as /dev/kvm, root's
// and read-write for group `kvm` (KVMGroup), the way a Debian host has it: once inside the
// sandbox, where its QEMUs open it, and once under h.Root, where an agent with that root
// prefix looks for it. Both go with the host.
func AddKVMDevice(t testing.TB, h *systemdhost.Host) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(h.Root, "etc/group"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprintf(f, "kvm:x:%d:\n", KVMGroup)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	// The sandbox's /dev is a tmpfs of its own mount namespace, reached through its PID 1.
	for _, dev := range []string{fmt.Sprintf("/proc/%d/root/dev/kvm", h.PID), filepath.Join(h.Root, "dev/kvm")} {
		if err := unix.Mknod(dev, unix.S_IFCHR|0o660, int(unix.Mkdev(10, 232))); err != nil { //nolint:gosec // a device number fits
			t.Fatalf("make %s: %v", dev, err)
		}
		if err := os.Chown(dev, 0, KVMGroup); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dev, 0o660); err != nil {
			t.Fatal(err)
		}
	}
}
