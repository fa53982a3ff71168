package microvm_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func run(t *testing.T, r *microvm.Runner, req microvm.Request) microvm.Result {
	t.Helper()
	res, err := r.Run(context.Background(), req)
	if err != nil {
		t.Fatalf("run %q: %v (%+v)", req.Command, err, res)
	}
	t.Logf("%q -> %s exit %d in %d ms", req.Command, res.Phase, res.ExitCode, res.DurationMillis)
	return res
}

// starts are the two ways a run gets its VM: every isolation check runs against both.
var starts = []microvm.Start{microvm.StartCold, microvm.StartWarm}

// startRunner returns a runner whose runs start as start: with a pool of one VM for warm.
func startRunner(t *testing.T, start microvm.Start, cfg microvm.Config) (*microvm.Runner, *systemdhost.Host) {
	t.Helper()
	if start == microvm.StartWarm {
		cfg.PoolSize = 1
	}
	return microvmguest.Start(t, cfg)
}

// runAs runs req through the Executor once a warm VM waits (for warm) and checks how it started.
func runAs(t *testing.T, r *microvm.Runner, start microvm.Start, req microvm.Request) microvm.Result {
	t.Helper()
	if start == microvm.StartWarm {
		waitWarm(t, r, 1)
	}
	return execute(t, r, "vm", start, req)
}

func TestVMReturnsStdoutStderrAndExitCode(t *testing.T) {
	for _, start := range starts {
		t.Run(string(start), func(t *testing.T) { testStdoutStderrAndExitCode(t, start) })
	}
}

func testStdoutStderrAndExitCode(t *testing.T, start microvm.Start) {
	r, _ := startRunner(t, start, microvm.Config{})
	res := runAs(t, r, start, microvm.Request{
		Command: []string{"sh", "-c", `echo "out:$1"; echo "err:$2" >&2; id -u; cat; exit 7`, "sh", "it's", "a \"quoted\" $word"},
		Stdin:   []byte("from stdin\n"),
	})
	if res.Phase != microvm.Failed || res.ExitCode != 7 {
		t.Fatalf("phase %s exit %d, want Failed 7 (%s)", res.Phase, res.ExitCode, res.Message)
	}
	if want := "out:it's\n1000\nfrom stdin\n"; string(res.Stdout) != want {
		t.Errorf("stdout %q, want %q", res.Stdout, want)
	}
	if want := "err:a \"quoted\" $word\n"; string(res.Stderr) != want {
		t.Errorf("stderr %q, want %q", res.Stderr, want)
	}
	res = runAs(t, r, start, microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Succeeded || res.ExitCode != 0 || len(res.Stdout)+len(res.Stderr) != 0 {
		t.Fatalf("true: %+v", res)
	}
}

func TestVMTimeoutStopsTheVM(t *testing.T) {
	for _, start := range starts {
		t.Run(string(start), func(t *testing.T) { testTimeoutStopsTheVM(t, start) })
	}
}

func testTimeoutStopsTheVM(t *testing.T, start microvm.Start) {
	r, h := startRunner(t, start, microvm.Config{})
	var unit string
	var pid uint32
	if start == microvm.StartWarm {
		// The one VM there is the one the run claims.
		waitWarm(t, r, 1)
		unit, pid = waitQEMU(t, h)
	}
	done := make(chan microvm.Result)
	go func() {
		res, _ := r.Execute(context.Background(), "vm", microvm.Request{Command: []string{"sleep", "600"}, TimeoutSeconds: 5})
		done <- res
	}()
	if start == microvm.StartCold {
		unit, pid = waitQEMU(t, h)
	}
	// While it runs, QEMU is an unprivileged process under a seccomp filter.
	var fields map[string]string
	poll.Until(t, "QEMU's seccomp filter (QEMU sets it while it starts)", 10*time.Second, func() (bool, string) {
		fields = procStatus(t, h.ProcPath(pid, "status"))
		return fields["Seccomp"] == "2", fmt.Sprint(fields)
	})
	for k, want := range map[string]string{
		"Uid": "64531 64531 64531 64531", "Gid": "64531 64531 64531 64531",
		"Seccomp": "2", "NoNewPrivs": "1", "CapEff": "0000000000000000", "CapPrm": "0000000000000000",
	} {
		if fields[k] != want {
			t.Errorf("QEMU's %s is %q, want %q", k, fields[k], want)
		}
	}
	// Its own group only: nothing that opens a device or a file of another group.
	if g := fields["Groups"]; g != "" && g != "64531" {
		t.Errorf("QEMU's supplementary groups are %q, want none but its own", g)
	}
	res := <-done
	if res.Phase != microvm.TimedOut || res.Start != start {
		t.Fatalf("phase %s start %s, want TimedOut %s (%+v)", res.Phase, res.Start, start, res)
	}
	if _, err := os.Stat(h.ProcPath(pid, "")); err == nil {
		t.Fatalf("QEMU (pid %d) still runs after the timeout", pid)
	}
	// The pool's refill is not part of the run.
	r.Close()
	assertUnitGone(t, h, unit)
	t.Logf("timed out after %d ms: %s", res.DurationMillis, res.Message)
}

// waitQEMU waits for the run's unit on h and returns it with QEMU's pid (as h's systemd sees it).
func waitQEMU(t *testing.T, h *systemdhost.Host) (string, uint32) {
	t.Helper()
	sd := h.Dial(t)
	var unit string
	var pid uint32
	poll.Until(t, "a running tool-run unit", 20*time.Second, func() (bool, string) {
		units, err := sd.RunningInstances(context.Background(), microvm.UnitPrefix+"*.service")
		if err != nil {
			return false, err.Error()
		}
		for u, p := range units {
			unit, pid = u, p
		}
		if len(units) != 1 || pid == 0 {
			return false, fmt.Sprint(units)
		}
		// Until systemd's child has become QEMU, it is still root.
		cmdline, _ := os.ReadFile(h.ProcPath(pid, "cmdline"))
		return strings.Contains(string(cmdline), "toolrun-"), fmt.Sprintf("%s: %q", unit, cmdline)
	})
	return unit, pid
}

// procStatus reads a /proc/<pid>/status file into a map.
func procStatus(t testing.TB, path string) map[string]string {
	t.Helper()
	status, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return fields
}

// assertUnitGone fails the test when h's systemd still knows unit (when given) or any tool-run
// unit.
func assertUnitGone(t *testing.T, h *systemdhost.Host, unit string) {
	t.Helper()
	if unit != "" {
		state, err := h.Dial(t).LoadState(context.Background(), unit)
		if err != nil || state != "not-found" {
			t.Errorf("unit %s after the run: LoadState %q (%v), want not-found", unit, state, err)
		}
	}
	out, err := h.Systemctl(context.Background(), "list-units", "--all", "--no-legend", "--plain", microvm.UnitPrefix+"*")
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("tool-run units left after the run (%v):\n%s", err, out)
	}
}

func TestVMGuestSeesNoHostFileNoNetworkNoDisk(t *testing.T) {
	for _, start := range starts {
		t.Run(string(start), func(t *testing.T) { testGuestSeesNoHostFileNoNetworkNoDisk(t, start) })
	}
}

func testGuestSeesNoHostFileNoNetworkNoDisk(t *testing.T, start microvm.Start) {
	r, _ := startRunner(t, start, microvm.Config{})
	// A token the host holds in files the guest must not see. The command gets it in two halves,
	// so the job archive itself never contains it.
	token := "host-secret-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	for _, dir := range []string{os.TempDir(), filepath.Dir(os.Args[0])} {
		f := filepath.Join(dir, "gwvm-sentinel-"+strconv.Itoa(os.Getpid()))
		if err := os.WriteFile(f, []byte(token), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(f) })
	}
	half := len(token) / 2
	probe := `
for d in /*; do case $d in /proc|/sys|/dev) ;; *) grep -rlF "$1$2" "$d" 2>/dev/null | sed 's/^/found:/';; esac; done
echo "net:$(ls /sys/class/net | tr '\n' ' ')"
echo "block:$(ls /sys/block | tr '\n' ' ')"
echo "virtio:$(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
echo "pci:$(ls /sys/bus/pci/devices 2>/dev/null | tr '\n' ' ')"
echo "fs:$(awk '{print $3}' /proc/mounts | sort -u | tr '\n' ' ')"
echo "routes:$(ip route show | tr '\n' ' ')"
echo "uid:$(id -u)"
for dev in /dev/ttyS0 /dev/console /dev/kmsg /dev/mem; do (echo forged >"$dev") 2>/dev/null && echo "wrote:$dev"; done
echo "host-os:$(test -e /etc/os-release && echo yes || echo no)"
`
	res := runAs(t, r, start, microvm.Request{Command: []string{"sh", "-c", probe, "sh", token[:half], token[half:]}})
	if res.Phase != microvm.Succeeded {
		t.Fatalf("probe: %+v", res)
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(res.Stdout)), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if k == "found" {
			t.Errorf("the guest sees the host's token in %s", v)
		}
		got[k] = strings.TrimSpace(v)
	}
	for k, want := range map[string]string{
		"net": "lo", "block": "", "virtio": "", "pci": "", "routes": "",
		"fs": "devtmpfs proc rootfs sysfs tmpfs", "uid": "1000", "host-os": "no",
	} {
		if got[k] != want {
			t.Errorf("guest %s = %q, want %q", k, got[k], want)
		}
	}
	if strings.Contains(string(res.Stdout), "wrote:") {
		t.Errorf("the unprivileged guest user could write to a console or memory device:\n%s", res.Stdout)
	}
}

func TestVMOutputFloodIsCapped(t *testing.T) {
	for _, start := range starts {
		t.Run(string(start), func(t *testing.T) { testOutputFloodIsCapped(t, start) })
	}
}

func testOutputFloodIsCapped(t *testing.T, start microvm.Start) {
	const capBytes = 32 << 10
	r, _ := startRunner(t, start, microvm.Config{OutputCap: capBytes})
	res := runAs(t, r, start, microvm.Request{Command: []string{"sh", "-c",
		`head -c 4000000 /dev/zero | tr '\0' o; head -c 4000000 /dev/zero | tr '\0' e >&2; exit 3`}})
	if res.Phase != microvm.Failed || res.ExitCode != 3 {
		t.Fatalf("phase %s exit %d, want Failed 3 (%s)", res.Phase, res.ExitCode, res.Message)
	}
	if len(res.Stdout) != capBytes || !res.StdoutTruncated || strings.Trim(string(res.Stdout), "o") != "" {
		t.Errorf("stdout: %d bytes, truncated=%v", len(res.Stdout), res.StdoutTruncated)
	}
	if len(res.Stderr) != capBytes || !res.StderrTruncated || strings.Trim(string(res.Stderr), "e") != "" {
		t.Errorf("stderr: %d bytes, truncated=%v", len(res.Stderr), res.StderrTruncated)
	}
}

func TestVMRejectsBadRequestsWithoutBooting(t *testing.T) {
	r := microvmguest.Runner(t, microvm.Config{})
	for name, req := range map[string]microvm.Request{
		"empty":         {},
		"nul":           {Command: []string{"echo", "a\x00b"}},
		"stdin":         {Command: []string{"cat"}, Stdin: make([]byte, microvm.MaxStdinBytes+1)},
		"timeout":       {Command: []string{"true"}, TimeoutSeconds: 3600},
		"negative time": {Command: []string{"true"}, TimeoutSeconds: -1},
	} {
		res, err := r.Run(context.Background(), req)
		if err != nil || res.Phase != microvm.Rejected || res.Message == "" {
			t.Errorf("%s: %+v, %v; want Rejected with a reason", name, res, err)
		}
	}
}
