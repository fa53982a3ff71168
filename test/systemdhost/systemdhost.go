// Package systemdhost boots real systemd hosts for tests: systemd 252 as PID 1 of fresh
// namespaces over a throw-away root folder, driven over its own D-Bus system bus. Each host has
// its own root folder (its own /opt/agent and /etc/systemd/system), its own cgroup and, on
// request, its own network namespace. Hosts are torn down by t.Cleanup even when a test fails or
// panics, and CheckLeftovers tells whether anything survived.
//
// Tests using this package need root. They prepare the template root folder with
// hack/systemd-rootfs.sh (make test does this and exports GATEWAY_SYSTEMD_ROOTFS).
package systemdhost

import (
	"bytes"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

//go:embed init.sh
var initScript []byte

// cgroupParent holds one cgroup per sandbox, named "<test process pid>.<n>".
const cgroupParent = "gateway-operator-test"

// Options shape one host.
type Options struct {
	// Name is the host name inside the sandbox; defaults to "host-<n>".
	Name string
	// PrivateNetwork gives the host its own network namespace, with only a loopback interface.
	PrivateNetwork bool
	// BootTimeout bounds the wait for systemd to finish booting; defaults to 60s.
	BootTimeout time.Duration
	// Dir is the folder the host's root folder is made in; Start uses the test's temp folder.
	Dir string
}

// Host is one running sandboxed systemd.
type Host struct {
	// Name is the sandbox's host name.
	Name string
	// Root is the host's root folder as seen from the test: ROOT/etc/systemd/system is the
	// sandbox's /etc/systemd/system.
	Root string
	// PID is systemd's PID as seen from the test (it is PID 1 inside).
	PID int
	// BusAddress is the D-Bus address of the sandbox's system bus.
	BusAddress string

	cgroup  string
	netns   bool
	unshare *exec.Cmd
	exited  chan struct{}
	logPath string
}

var seq atomic.Int64

// Start boots a host and registers its teardown with t.Cleanup.
func Start(t testing.TB, opts Options) *Host {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" {
			t.Fatal("systemd test hosts need root, and GATEWAY_TEST_REQUIRE_ALL is set")
		}
		t.Skip("systemd test hosts need root; run make test as root")
	}
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	h, err := Boot(opts)
	if h != nil {
		t.Cleanup(func() {
			if err := h.Stop(); err != nil {
				t.Errorf("tear down systemd host %s: %v", h.Name, err)
			}
		})
	}
	if err != nil {
		if h != nil {
			t.Logf("systemd output of %s:\n%s", h.Name, h.bootLog())
		}
		t.Fatalf("boot systemd host: %v", err)
	}
	return h
}

// Boot boots a host outside a test (the demo uses it). The caller must Stop it; a host whose
// boot failed is returned too, so that it can be stopped.
func Boot(opts Options) (*Host, error) {
	template, err := templateRoot()
	if err != nil {
		return nil, err
	}
	n := seq.Add(1)
	if opts.Name == "" {
		opts.Name = fmt.Sprintf("host-%d", n)
	}
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 60 * time.Second
	}
	// The folder name marks every mount point as ours, so leftovers are easy to find.
	dir := filepath.Join(opts.Dir, "gateway-sandbox-"+opts.Name)
	root := filepath.Join(dir, "root")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.Command("cp", "-a", template, root).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("copy template root: %v: %s", err, out)
	}
	if err := personalize(root, opts.Name); err != nil {
		return nil, err
	}
	initPath := filepath.Join(dir, "init.sh")
	if err := os.WriteFile(initPath, initScript, 0o755); err != nil {
		return nil, err
	}

	cg, err := cgroupRoot()
	if err != nil {
		return nil, err
	}
	SweepStale()
	cgPath := filepath.Join(cg, cgroupParent, fmt.Sprintf("%d.%d", os.Getpid(), n))
	if err := os.MkdirAll(cgPath, 0o755); err != nil {
		return nil, fmt.Errorf("create sandbox cgroup: %w", err)
	}
	h := &Host{Name: opts.Name, Root: root, cgroup: cgPath, netns: opts.PrivateNetwork, exited: make(chan struct{}),
		logPath: filepath.Join(dir, "systemd.log")}

	cgfd, err := os.Open(cgPath)
	if err != nil {
		_ = os.Remove(cgPath)
		return nil, err
	}
	defer cgfd.Close()
	logf, err := os.Create(h.logPath)
	if err != nil {
		_ = os.Remove(cgPath)
		return nil, err
	}
	defer logf.Close()

	args := []string{"--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts", "--ipc", "--cgroup", "--propagation", "private"}
	if opts.PrivateNetwork {
		args = append(args, "--net")
	}
	args = append(args, "--", "/bin/sh", initPath, root, opts.Name)
	cmd := exec.Command("unshare", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	// Born inside its own cgroup: nothing it starts can escape teardown through cgroup.kill.
	// If the test binary dies, Pdeathsig kills unshare and --kill-child the sandbox's PID 1, which
	// takes the whole PID namespace with it; sweepStale removes the empty cgroup next time.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgfd.Fd()), Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = os.Remove(cgPath)
		return nil, fmt.Errorf("start unshare: %w", err)
	}
	h.unshare = cmd
	go func() { _ = cmd.Wait(); close(h.exited) }()

	ctx, cancel := context.WithTimeout(context.Background(), opts.BootTimeout)
	defer cancel()
	if err := h.waitBooted(ctx); err != nil {
		return h, err
	}
	return h, nil
}

// personalize gives a fresh copy of the template its own identity.
func personalize(root, name string) error {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc/machine-id"), []byte(hex.EncodeToString(id)+"\n"), 0o444); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(root, "etc/hostname"), []byte(name+"\n"), 0o644)
}

// waitBooted waits for systemd to be PID 1 of the sandbox, for its bus, and for the boot to end.
func (h *Host) waitBooted(ctx context.Context) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	wait := func(what string, ready func() bool) error {
		for !ready() {
			select {
			case <-h.exited:
				return fmt.Errorf("sandbox exited while waiting for %s", what)
			case <-ctx.Done():
				return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
			case <-tick.C:
			}
		}
		return nil
	}
	if err := wait("systemd to start", func() bool {
		pid, ok := h.findInit()
		if ok {
			h.PID = pid
		}
		return ok
	}); err != nil {
		return err
	}
	h.BusAddress = fmt.Sprintf("unix:path=/proc/%d/root/run/dbus/system_bus_socket", h.PID)
	var conn *systemd.Conn
	if err := wait("the system bus", func() bool {
		c, err := systemd.Dial(ctx, h.BusAddress)
		if err != nil {
			return false
		}
		conn = c
		return true
	}); err != nil {
		return err
	}
	defer conn.Close()
	var state string
	if err := wait("the boot to finish", func() bool {
		state, _ = conn.SystemState(ctx)
		return state == "running" || state == "degraded"
	}); err != nil {
		return err
	}
	if state == "degraded" {
		out, _ := h.Systemctl(ctx, "--failed", "--no-legend", "--plain")
		return fmt.Errorf("host booted degraded; failed units:\n%s", out)
	}
	return nil
}

// findInit returns the host PID of the sandbox's PID 1 once it runs systemd.
func (h *Host) findInit() (int, bool) {
	children, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", h.unshare.Process.Pid, h.unshare.Process.Pid))
	if err != nil {
		return 0, false
	}
	for _, f := range strings.Fields(string(children)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err == nil && strings.HasSuffix(exe, "/systemd/systemd") {
			return pid, true
		}
	}
	return 0, false
}

// ProcPath is the test-side path of a file in the sandbox's /proc, for a PID as systemd sees it
// (for example a unit's MainPID): ProcPath(pid, "environ").
func (h *Host) ProcPath(pid uint32, file string) string {
	return fmt.Sprintf("/proc/%d/root/proc/%d/%s", h.PID, pid, file)
}

// Dial connects to the host's systemd over its bus. The connection is closed at cleanup.
func (h *Host) Dial(t testing.TB) *systemd.Conn {
	t.Helper()
	c, err := systemd.Dial(context.Background(), h.BusAddress)
	if err != nil {
		t.Fatalf("dial systemd on %s: %v", h.Name, err)
	}
	t.Cleanup(c.Close)
	return c
}

// Exec runs a command inside the sandbox's namespaces and returns its combined output.
func (h *Host) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	ns := []string{"-t", strconv.Itoa(h.PID), "-m", "-p", "-u", "-i", "-C"}
	if h.netns {
		ns = append(ns, "-n")
	}
	ns = append(ns, "--", name)
	cmd := exec.CommandContext(ctx, "nsenter", append(ns, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// Systemctl runs systemctl inside the sandbox.
func (h *Host) Systemctl(ctx context.Context, args ...string) ([]byte, error) {
	return h.Exec(ctx, "systemctl", args...)
}

// Journal returns the sandbox's journal for a unit (or all of it when unit is empty).
func (h *Host) Journal(unit string) string {
	args := []string{"-D", filepath.Join(h.Root, "var/log/journal"), "--no-pager", "-o", "short-monotonic"}
	if unit != "" {
		args = append(args, "-u", unit)
	}
	out, _ := exec.Command("journalctl", args...).CombinedOutput()
	return string(out)
}

func (h *Host) bootLog() string {
	b, _ := os.ReadFile(h.logPath)
	return string(b) + h.Journal("")
}

// Stop powers the host off, kills whatever is left through its cgroup and removes the cgroup.
// It is safe to call more than once.
func (h *Host) Stop() error {
	if h.unshare == nil {
		return nil
	}
	defer func() { h.unshare = nil }()
	if h.PID != 0 {
		// SIGRTMIN+4 asks systemd for a clean poweroff.
		_ = syscall.Kill(h.PID, syscall.Signal(34+4))
		select {
		case <-h.exited:
		case <-time.After(15 * time.Second):
		}
	}
	var errs []error
	if err := killCgroup(h.cgroup); err != nil {
		errs = append(errs, err)
	}
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		errs = append(errs, errors.New("unshare did not exit"))
	}
	if err := removeCgroupTree(h.cgroup); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// killCgroup kills every process in a cgroup tree and waits until it is empty.
func killCgroup(path string) error {
	if err := os.WriteFile(filepath.Join(path, "cgroup.kill"), []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cgroup.kill %s: %w", path, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		events, err := os.ReadFile(filepath.Join(path, "cgroup.events"))
		if err != nil || bytes.Contains(events, []byte("populated 0")) {
			return nil //nolint:nilerr // a cgroup that cannot be read any more is gone
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still populated after cgroup.kill", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SweepStale removes the sandbox cgroups of test processes that no longer exist, killing
// anything still in them. Start calls it; a test that kills a test process calls it too.
func SweepStale() {
	cg, err := cgroupRoot()
	if err != nil {
		return
	}
	parent := filepath.Join(cg, cgroupParent)
	entries, _ := os.ReadDir(parent)
	for _, e := range entries {
		owner, _, ok := strings.Cut(e.Name(), ".")
		pid, err := strconv.Atoi(owner)
		if !ok || err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		p := filepath.Join(parent, e.Name())
		_ = killCgroup(p)
		_ = removeCgroupTree(p)
	}
}

// removeCgroupTree removes a cgroup and the children systemd made in it, deepest first.
func removeCgroupTree(path string) error {
	var dirs []string
	_ = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// cgroupRoot finds the cgroup2 hierarchy: /sys/fs/cgroup on a unified machine, or the unified
// subtree of a hybrid one.
func cgroupRoot() (string, error) {
	for _, p := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		var st syscall.Statfs_t
		if err := syscall.Statfs(p, &st); err == nil && st.Type == 0x63677270 { // CGROUP2_SUPER_MAGIC
			return p, nil
		}
	}
	return "", errors.New("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

// templateRoot returns the folder prepared by hack/systemd-rootfs.sh, running it if needed.
func templateRoot() (string, error) {
	if p := os.Getenv("GATEWAY_SYSTEMD_ROOTFS"); p != "" {
		return p, nil
	}
	script, err := repo.Path("hack/systemd-rootfs.sh")
	if err != nil {
		return "", err
	}
	out, err := exec.Command(script).Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w", script, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Leftovers lists the sandbox cgroups and mounts this test process made that still exist.
func Leftovers() ([]string, error) {
	cg, err := cgroupRoot()
	if err != nil {
		return nil, err
	}
	var left []string
	entries, err := os.ReadDir(filepath.Join(cg, cgroupParent))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	prefix := strconv.Itoa(os.Getpid()) + "."
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
			left = append(left, "cgroup "+filepath.Join(cg, cgroupParent, e.Name()))
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, "gateway-sandbox-") {
			left = append(left, "mount "+line)
		}
	}
	return left, nil
}

// RunWithLeakCheck runs a package's tests, then fails the run if a sandbox survived them.
// Use it from TestMain: os.Exit(systemdhost.RunWithLeakCheck(m)).
func RunWithLeakCheck(m *testing.M) int {
	code := m.Run()
	left, err := Leftovers()
	if err != nil {
		fmt.Fprintf(os.Stderr, "systemdhost: leak check failed: %v\n", err)
		return 1
	}
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "systemdhost: sandboxes left behind:\n  %s\n", strings.Join(left, "\n  "))
		return 1
	}
	return code
}
