package layout_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// TestHostToolsRunChrooted shows that with HostTools a tool runs from the host's root and sees
// the host's files at their own paths, which is how the agent's container runs the host's
// systemd-analyze and useradd; without it the agent's own tool sees the agent's filesystem.
func TestHostToolsRunChrooted(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("chroot needs root") // CI runs as root
	}
	busybox, err := exec.LookPath("busybox") // static: runs inside a root with nothing else
	if err != nil {
		t.Fatal("busybox is missing (hack/host-deps.sh installs busybox-static)")
	}
	root := t.TempDir()
	b, err := os.ReadFile(busybox) //nolint:gosec // the machine's busybox
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), b, 0o755); err != nil { //nolint:gosec // an executable, as on a host
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "marker"), []byte("inside the host root"), 0o644); err != nil { //nolint:gosec // test data
		t.Fatal(err)
	}
	h := layout.Host{Root: root, HostTools: true}
	if h.ToolRoot() != "/" {
		t.Errorf("ToolRoot with HostTools is %q, want /", h.ToolRoot())
	}
	out, err := h.Command(t.Context(), "/bin/busybox", "cat", "/marker").CombinedOutput()
	if err != nil || string(out) != "inside the host root" {
		t.Fatalf("chrooted tool: %v: %q", err, out)
	}
	h.HostTools = false
	if h.ToolRoot() != root {
		t.Errorf("ToolRoot without HostTools is %q, want %q", h.ToolRoot(), root)
	}
	out, err = h.Command(t.Context(), "/bin/busybox", "cat", "/marker").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No such file") {
		t.Errorf("the agent's own tool read /marker from the host root: %v: %q", err, out)
	}
}
