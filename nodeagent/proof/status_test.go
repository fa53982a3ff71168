package proof_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
)

// TestReadStatusHasADeadline: a gateway that accepts and never answers costs the agent one
// StatusTimeout, not forever.
func TestReadStatusHasADeadline(t *testing.T) {
	dir := t.TempDir()
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	host := layout.Host{Root: dir}
	if err := os.MkdirAll(filepath.Join(host.On(p.Home), "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", host.On(p.StatusSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accepted, never answered
		}
	}()
	done := make(chan error, 1)
	go func() {
		_, err := proof.ReadStatus(context.Background(), host, p)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a mute gateway answered")
		}
	case <-time.After(10 * proof.StatusTimeout):
		t.Fatal("ReadStatus on a mute gateway did not return")
	}
}

// TestReadStatusRefusesSymlinks: the socket is reached only through real folders under the
// profile's root-owned folder; a gateway cannot point the agent at another socket.
func TestReadStatusRefusesSymlinks(t *testing.T) {
	dir := t.TempDir()
	p, _ := layout.ForProfile("core")
	host := layout.Host{Root: dir}
	other := filepath.Join(t.TempDir(), "other")
	if err := os.MkdirAll(other, 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(other, "status.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := os.MkdirAll(host.On(p.Home), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, filepath.Join(host.On(p.Home), "run")); err != nil {
		t.Fatal(err)
	}
	if _, err := proof.ReadStatus(context.Background(), host, p); err == nil || !strings.Contains(err.Error(), "symbolic link") && !errors.Is(err, unix.ELOOP) {
		t.Fatalf("a symlinked run/ folder was followed: %v", err)
	}
}

func TestImportPath(t *testing.T) {
	cur, rel := "/opt/agent/gateways/core/current", "/opt/agent/releases/abc-1"
	good := []string{rel, cur, "/usr/lib/python311.zip", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"}
	if err := proof.ImportPath(good, cur, rel); err != nil {
		t.Errorf("a clean import path was refused: %v", err)
	}
	for _, bad := range [][]string{
		nil,
		append(good, "/opt/agent/gateways/core/home/.local/lib/python3.11/site-packages"),
		append(good, "/tmp"),
		append(good, "relative"),
		append(good, "/usr/../opt/agent/gateways/core/home"),
		append(good, "/opt/agent/releases/abc-10"),
	} {
		if err := proof.ImportPath(bad, cur, rel); err == nil {
			t.Errorf("import path %q was accepted", bad)
		}
	}
}

func TestInControlGroupAndStartTime(t *testing.T) {
	proc := t.TempDir()
	if err := os.MkdirAll(filepath.Join(proc, "123"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A hybrid hierarchy: only the unified line (0::) counts. The agent may see the unit's
	// path below the cgroup namespace of a sandboxed systemd.
	cg := "12:cpu,cpuacct:/x\n1:name=systemd:/y\n0::/sandbox/7/system.slice/agent-gateway@core.service\n"
	if err := os.WriteFile(filepath.Join(proc, "123", "cgroup"), []byte(cg), 0o644); err != nil {
		t.Fatal(err)
	}
	// The command name may hold spaces and parentheses; field 22 follows the last ')'.
	stat := "123 (evil) 1 2 3) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 100\n"
	if err := os.WriteFile(filepath.Join(proc, "123", "stat"), []byte(stat), 0o644); err != nil {
		t.Fatal(err)
	}
	unit := "/system.slice/agent-gateway@core.service"
	if err := proof.InControlGroup(proc, 123, unit); err != nil {
		t.Errorf("in its unit's control group: %v", err)
	}
	for _, other := range []string{"/system.slice/agent-gateway@api.service", "/ore.service", "/", "", "core.service"} {
		if err := proof.InControlGroup(proc, 123, other); err == nil {
			t.Errorf("matched control group %q", other)
		}
	}
	if st, err := proof.StartTime(proc, 123); err != nil || st != 987654 {
		t.Errorf("start time %d, %v; want 987654", st, err)
	}
	if st, err := proof.StartTime("/proc", uint32(os.Getpid())); err != nil || st <= 0 {
		t.Errorf("own start time %d: %v", st, err)
	}
}
