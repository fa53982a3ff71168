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
