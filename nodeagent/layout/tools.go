package layout

import (
	"context"
	"os/exec"
	"path"
	"syscall"
)

// Host tools the agent runs. Their paths are the ones Debian and its derivatives install.
const (
	SystemdAnalyze = "/usr/bin/systemd-analyze"
	UserAdd        = "/usr/sbin/useradd"
)

// Command runs a tool of the host. With HostTools the host's own binary at toolPath runs
// chrooted into Root, so an agent whose image carries no systemd-analyze or useradd uses the
// host's, which also match the host's systemd version and login.defs; arguments must then
// name paths as the host sees them (see ToolRoot). Without it the agent's own binary of that
// name is found in its PATH.
func (h Host) Command(ctx context.Context, toolPath string, args ...string) *exec.Cmd {
	if !h.HostTools {
		return exec.CommandContext(ctx, path.Base(toolPath), args...) //nolint:gosec // a fixed tool name from the constants above
	}
	cmd := exec.CommandContext(ctx, toolPath, args...) //nolint:gosec // see above
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: h.Root}
	cmd.Dir = "/"
	return cmd
}

// ToolRoot is the root prefix to hand a tool (systemd-analyze --root, useradd --prefix): "/"
// when the tool runs chrooted into the host, Root otherwise.
func (h Host) ToolRoot() string {
	if h.HostTools {
		return "/"
	}
	return h.Root
}
