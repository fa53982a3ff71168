package apply

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// DefaultMinStagingReserve is the space only root may use that the agent wants on the
// filesystem of its releases when gateways' homes live there too.
const DefaultMinStagingReserve = 64 << 20

// StagingSpace is what the filesystem of the host's releases keeps for the agent alone. A
// gateway runs as an unprivileged user, so it can fill its home (and with it a filesystem the
// releases share) only up to the blocks reserved for root (ext4 keeps 5% by default): the agent
// can then still stage the release that fixes it.
type StagingSpace struct {
	// Shared is true when profiles' folders live on the same filesystem as the releases.
	Shared bool
	// Reserved is the free space only root may use, in bytes.
	Reserved uint64
	// Available is the free space anyone may use, in bytes.
	Available uint64
}

// OK tells whether a gateway that fills its home still leaves the agent at least min bytes.
func (s StagingSpace) OK(min uint64) bool { return !s.Shared || s.Reserved >= min }

// String says in words what the space is and what to do when it is not enough.
func (s StagingSpace) String() string {
	return s.describe(fmt.Sprintf(" (%d MiB free for anyone)", s.Available>>20))
}

// Reserve is String without the free space, which changes as files come and go: a status
// that carries it would be written on every heartbeat.
func (s StagingSpace) Reserve() string { return s.describe("") }

func (s StagingSpace) describe(free string) string {
	if !s.Shared {
		return "profiles' folders are on another filesystem than the releases: a gateway that fills its home cannot fill the agent's"
	}
	return fmt.Sprintf("the filesystem of %s, shared with profiles' homes, keeps %d MiB that only root may use%s; "+
		"a gateway can fill its home up to that reserve, the agent can still stage a release beyond it "+
		"(raise it with tune2fs -m, or put %s on its own filesystem)", layout.ReleasesDir, s.Reserved>>20, free, layout.GatewaysDir)
}

// StagingSpace measures the filesystem of the host's releases.
func (a *Applier) StagingSpace() (StagingSpace, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(a.Host.On(layout.ReleasesDir), &fs); err != nil {
		return StagingSpace{}, fmt.Errorf("statfs %s: %w", layout.ReleasesDir, err)
	}
	var s StagingSpace
	bsize := uint64(fs.Bsize) //nolint:gosec // a block size is positive
	s.Available = fs.Bavail * bsize
	if fs.Bfree > fs.Bavail {
		s.Reserved = (fs.Bfree - fs.Bavail) * bsize
	}
	rel, err1 := os.Stat(a.Host.On(layout.ReleasesDir))
	gw, err2 := os.Stat(a.Host.On(layout.GatewaysDir))
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("stat the host layout: %v %v", err1, err2)
	}
	s.Shared = rel.Sys().(*syscall.Stat_t).Dev == gw.Sys().(*syscall.Stat_t).Dev
	return s, nil
}
