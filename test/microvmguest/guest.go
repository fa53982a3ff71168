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
	kernel, initramfs := Files(t)
	h := systemdhost.Start(t, systemdhost.Options{})
	AddQEMUUser(t, h)
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
	return r, h
}
