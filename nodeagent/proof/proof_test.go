package proof

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

func TestResolveStaysUnderRoot(t *testing.T) {
	root := t.TempDir()
	host := layout.Host{Root: root}
	mk := func(p string) {
		if err := os.MkdirAll(filepath.Join(root, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, p string) {
		if err := os.Symlink(target, filepath.Join(root, p)); err != nil {
			t.Fatal(err)
		}
	}
	mk("opt/agent/releases/abc-1")
	mk("opt/agent/gateways/core")
	mk("usr/bin")
	link("../../releases/abc-1", "opt/agent/gateways/core/current")
	link("/opt/agent/releases/abc-1", "opt/agent/gateways/core/absolute")
	link("python3.11", "usr/bin/python3")
	if err := os.WriteFile(filepath.Join(root, "usr/bin/python3.11"), nil, 0o755); err != nil {
		t.Fatal(err)
	}
	link("usr/bin", "bin")
	link("loop", "loop")
	for in, want := range map[string]string{
		"/opt/agent/gateways/core/current":  "/opt/agent/releases/abc-1",
		"/opt/agent/gateways/core/absolute": "/opt/agent/releases/abc-1",
		"/bin/python3":                      "/usr/bin/python3.11",
		"/opt/agent/gateways/core/current/": "/opt/agent/releases/abc-1",
		"/../../opt":                        "/opt",
	} {
		got, err := Resolve(host, in)
		if err != nil || got != want {
			t.Errorf("Resolve(%s) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := Resolve(host, "/loop"); err == nil {
		t.Error("a link loop resolved")
	}
	if _, err := Resolve(host, "/missing/x"); err == nil {
		t.Error("a missing path resolved")
	}
}

func TestSiblings(t *testing.T) {
	before := map[string]uint32{"agent-gateway@core.service": 10, "agent-gateway@api.service": 20}
	if err := Siblings("agent-gateway@core.service", before, map[string]uint32{"agent-gateway@core.service": 11, "agent-gateway@api.service": 20}); err != nil {
		t.Error(err)
	}
	if err := Siblings("agent-gateway@core.service", before, map[string]uint32{"agent-gateway@core.service": 11, "agent-gateway@api.service": 21}); err == nil {
		t.Error("a restarted sibling went unnoticed")
	}
	if err := Siblings("agent-gateway@core.service", before, map[string]uint32{"agent-gateway@core.service": 11}); err == nil {
		t.Error("a stopped sibling went unnoticed")
	}
}
