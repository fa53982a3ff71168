package systemdhost_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func TestMain(m *testing.M) { os.Exit(systemdhost.RunWithLeakCheck(m)) }

const templateUnit = `[Unit]
Description=smoke test instance %i

[Service]
Type=exec
ExecStart=/bin/sleep infinity
`

// TestRestartOneInstanceLeavesSiblingRunning boots a real systemd, starts two instances of one
// template unit and restarts one: the other's MainPID must not change.
func TestRestartOneInstanceLeavesSiblingRunning(t *testing.T) {
	h := systemdhost.Start(t, systemdhost.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	unitPath := filepath.Join(h.Root, "etc/systemd/system/smoke@.service")
	if err := os.WriteFile(unitPath, []byte(templateUnit), 0o644); err != nil {
		t.Fatal(err)
	}
	sd := h.Dial(t)
	if err := sd.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"smoke@a.service", "smoke@b.service"} {
		if err := sd.Start(ctx, u); err != nil {
			t.Fatalf("start %s: %v\n%s", u, err, h.Journal(u))
		}
	}
	pidA, err := sd.MainPID(ctx, "smoke@a.service")
	if err != nil {
		t.Fatal(err)
	}
	pidB, err := sd.MainPID(ctx, "smoke@b.service")
	if err != nil {
		t.Fatal(err)
	}
	if pidA == 0 || pidB == 0 || pidA == pidB {
		t.Fatalf("MainPIDs a=%d b=%d: want two distinct running processes", pidA, pidB)
	}
	// The MainPID is systemd's view; the test reaches it through the sandbox's /proc.
	cmdline, err := os.ReadFile(h.ProcPath(pidA, "cmdline"))
	if err != nil || !strings.HasPrefix(string(cmdline), "/bin/sleep\x00infinity") {
		t.Fatalf("a's MainPID %d runs %q (%v), want /bin/sleep infinity", pidA, cmdline, err)
	}

	if err := sd.Restart(ctx, "smoke@a.service"); err != nil {
		t.Fatal(err)
	}
	newA, err := sd.MainPID(ctx, "smoke@a.service")
	if err != nil {
		t.Fatal(err)
	}
	afterB, err := sd.MainPID(ctx, "smoke@b.service")
	if err != nil {
		t.Fatal(err)
	}
	if newA == pidA || newA == 0 {
		t.Errorf("restart of a: MainPID %d -> %d, want a new process", pidA, newA)
	}
	if afterB != pidB {
		t.Errorf("restart of a changed b's MainPID %d -> %d", pidB, afterB)
	}
}

// TestHostsAreSeparate boots two hosts, one with its own network namespace: each has its own
// root folder, its own units, and the private one sees only a loopback interface.
func TestHostsAreSeparate(t *testing.T) {
	a := systemdhost.Start(t, systemdhost.Options{Name: "alpha"})
	b := systemdhost.Start(t, systemdhost.Options{Name: "beta", PrivateNetwork: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	if a.Root == b.Root || a.PID == b.PID {
		t.Fatalf("hosts share a root (%s) or a PID (%d)", a.Root, a.PID)
	}
	if err := os.WriteFile(filepath.Join(a.Root, "etc/systemd/system/only-a.service"),
		[]byte("[Service]\nType=exec\nExecStart=/bin/sleep infinity\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	sdA, sdB := a.Dial(t), b.Dial(t)
	if err := sdA.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sdB.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sdA.Start(ctx, "only-a.service"); err != nil {
		t.Fatal(err)
	}
	if err := sdB.Start(ctx, "only-a.service"); err == nil {
		t.Error("host beta started a unit that exists only on alpha")
	}
	for _, h := range []*systemdhost.Host{a, b} {
		out, err := h.Exec(ctx, "hostname")
		if err != nil || strings.TrimSpace(string(out)) != h.Name {
			t.Errorf("hostname inside %s = %q (%v)", h.Name, out, err)
		}
	}
	links, err := b.Exec(ctx, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatalf("ip link in beta: %v: %s", err, links)
	}
	if n := strings.Count(strings.TrimSpace(string(links)), "\n") + 1; n != 1 || !strings.Contains(string(links), "lo:") {
		t.Errorf("beta has a private network namespace, want only lo, got:\n%s", links)
	}
}

// TestStopLeavesNothing checks that a stopped host leaves no process, cgroup or mount behind,
// even when a unit was still running.
func TestStopLeavesNothing(t *testing.T) {
	h := systemdhost.Start(t, systemdhost.Options{})
	if _, err := h.Systemctl(context.Background(), "start", "--no-block", "systemd-tmpfiles-clean.service"); err != nil {
		t.Fatal(err)
	}
	pid := h.PID
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		t.Errorf("systemd (pid %d) still runs after Stop", pid)
	}
	left, err := systemdhost.Leftovers()
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("left behind after Stop: %v", left)
	}
}

// The crash tests below run this test binary again as a child that boots a host and then dies.
const crashEnv = "GATEWAY_SANDBOX_CRASH"

// TestCrashChild is not a test of its own: it is the child of the crash tests.
func TestCrashChild(t *testing.T) {
	mode := os.Getenv(crashEnv)
	if mode == "" {
		return
	}
	h := systemdhost.Start(t, systemdhost.Options{})
	fmt.Printf("SANDBOX_PID=%d\n", h.PID)
	switch mode {
	case "panic":
		panic("test panics with a host running")
	case "hang":
		time.Sleep(time.Hour)
	}
}

func runCrashChild(t *testing.T, mode string) (childPID, sandboxPID int, wait func() error) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.v")
	cmd.Env = append(os.Environ(), crashEnv+"="+mode)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "SANDBOX_PID="); ok {
			sandboxPID, _ = strconv.Atoi(v)
			break
		}
	}
	if sandboxPID == 0 {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatal("crash child did not boot a host")
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	return cmd.Process.Pid, sandboxPID, cmd.Wait
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 300; i++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("sandbox systemd (pid %d) still runs after its test process ended", pid)
}

// TestPanicTearsDown: a test that panics with a host running still tears the host down.
func TestPanicTearsDown(t *testing.T) {
	_, sandboxPID, wait := runCrashChild(t, "panic")
	if err := wait(); err == nil {
		t.Fatal("the panicking child exited 0")
	}
	waitGone(t, sandboxPID)
	assertNoSandboxCgroups(t)
}

// TestKilledTestProcessTearsDown: when a test process is SIGKILLed (no cleanup can run), its
// host dies with it and the next Start sweeps the empty cgroup.
func TestKilledTestProcessTearsDown(t *testing.T) {
	child, sandboxPID, wait := runCrashChild(t, "hang")
	if err := syscall.Kill(child, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = wait()
	waitGone(t, sandboxPID)
	systemdhost.SweepStale()
	assertNoSandboxCgroups(t)
}

// assertNoSandboxCgroups checks that no test process's sandbox cgroup remains but ours.
func assertNoSandboxCgroups(t *testing.T) {
	t.Helper()
	for _, base := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		entries, _ := os.ReadDir(filepath.Join(base, "gateway-operator-test"))
		for _, e := range entries {
			if e.IsDir() && !strings.HasPrefix(e.Name(), strconv.Itoa(os.Getpid())+".") {
				t.Errorf("sandbox cgroup %s/%s left behind", base, e.Name())
			}
		}
	}
}
