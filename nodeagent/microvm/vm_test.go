package microvm_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
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

func TestVMReturnsStdoutStderrAndExitCode(t *testing.T) {
	r := microvmguest.Runner(t, microvm.Config{})
	res := run(t, r, microvm.Request{
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
	res = run(t, r, microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Succeeded || res.ExitCode != 0 || len(res.Stdout)+len(res.Stderr) != 0 {
		t.Fatalf("true: %+v", res)
	}
}

func TestVMTimeoutStopsTheVM(t *testing.T) {
	r := microvmguest.Runner(t, microvm.Config{})
	done := make(chan microvm.Result)
	go func() {
		res, _ := r.Run(context.Background(), microvm.Request{Command: []string{"sleep", "600"}, TimeoutSeconds: 5})
		done <- res
	}()
	// While it runs, QEMU is an unprivileged process under a seccomp filter.
	var pid int
	deadline := time.Now().Add(5 * time.Second)
	for pid == 0 && time.Now().Before(deadline) {
		pid = findQEMU(t)
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 {
		t.Fatal("no QEMU process of the run was found")
	}
	status, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	for k, want := range map[string]string{
		"Uid": "64531 64531 64531 64531", "Gid": "64531 64531 64531 64531", "Groups": "",
		"Seccomp": "2", "NoNewPrivs": "1", "CapEff": "0000000000000000", "CapPrm": "0000000000000000",
	} {
		if fields[k] != want {
			t.Errorf("QEMU's %s is %q, want %q", k, fields[k], want)
		}
	}
	res := <-done
	if res.Phase != microvm.TimedOut {
		t.Fatalf("phase %s, want TimedOut (%+v)", res.Phase, res)
	}
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
		t.Fatalf("QEMU (pid %d) still runs after the timeout", pid)
	}
	t.Logf("timed out after %d ms: %s", res.DurationMillis, res.Message)
}

// findQEMU returns the pid of a QEMU started by a runner of this test, or 0.
func findQEMU(t *testing.T) int {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(string(cmdline), "toolrun-") && strings.Contains(string(cmdline), "/tmp/gwvm") {
			if ppid := parentOf(pid); ppid == os.Getpid() {
				return pid
			}
		}
	}
	return 0
}

func parentOf(pid int) int {
	status, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "PPid:\t"); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return 0
}

func TestVMGuestSeesNoHostFileNoNetworkNoDisk(t *testing.T) {
	r := microvmguest.Runner(t, microvm.Config{})
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
	res := run(t, r, microvm.Request{Command: []string{"sh", "-c", probe, "sh", token[:half], token[half:]}})
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
	const capBytes = 32 << 10
	r := microvmguest.Runner(t, microvm.Config{OutputCap: capBytes})
	res := run(t, r, microvm.Request{Command: []string{"sh", "-c",
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
