// Package microvmguest gives tests a real microVM runner: QEMU from the host (hack/host-deps.sh)
// and the guest kernel + initramfs of hack/microvm-guest.sh, whose folder `make test` passes in
// GATEWAY_MICROVM_GUEST.
package microvmguest

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/go-logr/logr/testr"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
)

// QEMUUser and QEMUGroup are the unprivileged ids tests run QEMU as.
const QEMUUser, QEMUGroup = 64531, 64531

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

// WorkDir makes a short folder under /tmp for per-run folders (unix socket paths must stay
// short) and removes it when the test ends.
func WorkDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "gwvm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// Runner returns a runner under TCG (the same on every CI machine), with cfg's non-zero fields
// taking precedence over the test defaults.
func Runner(t testing.TB, cfg microvm.Config) *microvm.Runner {
	t.Helper()
	kernel, initramfs := Files(t)
	if cfg.Kernel == "" {
		cfg.Kernel, cfg.Initramfs = kernel, initramfs
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = WorkDir(t)
	}
	if cfg.UID == 0 {
		cfg.UID, cfg.GID = QEMUUser, QEMUGroup
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
	return r
}
