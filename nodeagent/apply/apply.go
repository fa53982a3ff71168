// Package apply brings one GatewayInstance to a host: stage the release, write the environment
// file and units, flip the profile's `current` link, restart only that profile's unit, and prove
// the result from the running process. Every step is idempotent, so an agent killed at any point
// converges when it runs again; a failure after the flip returns the profile to its last good
// release before reporting.
package apply

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
)

// Step names one step of an apply, in order.
type Step string

// The steps of Apply, in the order they run.
const (
	StepPrepare Step = "prepare" // base folders, launcher, template unit, user, profile folders
	StepStage   Step = "stage"   // release downloaded, verified, unpacked, read-only
	StepWrite   Step = "write"   // env file and drop-in written; daemon-reload if units changed
	StepFlip    Step = "flip"    // `current` points at the release
	StepRestart Step = "restart" // the profile's unit restarted
	StepProve   Step = "prove"   // the running process shown to be aligned
	StepRecord  Step = "record"  // `last-good` points at the release
	StepCollect Step = "collect" // old releases removed
)

// Steps lists every step in order.
var Steps = []Step{StepPrepare, StepStage, StepWrite, StepFlip, StepRestart, StepProve, StepRecord, StepCollect}

// Instance is what one GatewayInstance asks of this host.
type Instance struct {
	Profile     string
	Release     release.Artifact
	Mode        v1.EntrypointMode
	Exec        string
	Isolation   v1.IsolationMode
	Env         []v1.EnvVar
	Egress      []string
	DeniedTools []string
	// KeepFailed leaves a host on a release that failed to apply instead of returning it to
	// its last good release (autoRollback off).
	KeepFailed bool
	// Probe, when its Count is set, probes the gateway's status endpoint Count times, Period
	// apart, after the proof.
	Probe Probe
}

// Probe is a health probe of a gateway's status endpoint after its proof.
type Probe struct {
	Count  int
	Period time.Duration
}

// Ref names a release on the host.
type Ref struct{ SHA256, Label string }

// Outcome is what Apply found and did.
type Outcome struct {
	// Current is the release `current` points at after the apply.
	Current Ref
	// LastGood is the newest release proven aligned, if any.
	LastGood *Ref
	// MainPID is the unit's main process as systemd reports it.
	MainPID uint32
	// Restarted is true when this apply restarted the unit.
	Restarted bool
	// Alignment is the proof taken from the running process.
	Alignment v1.AlignmentProof
	// Isolation describes how the instance is sandboxed.
	Isolation v1.IsolationProof
	// Isolated is true for a Production instance running as its own user.
	Isolated bool
	// ConfigHash digests everything rendered for the instance.
	ConfigHash string
	// User is the user the gateway runs as.
	User *users.User
}

// Failure is an apply that did not reach its goal. The host was left on a known release:
// RolledBack tells whether the profile was returned to its last good release.
type Failure struct {
	Step       Step
	Reason     string
	Message    string
	RolledBack bool
	// Retry is true when trying again later may succeed (a network error, say).
	Retry bool
}

func (f *Failure) Error() string {
	s := fmt.Sprintf("%s: %s", f.Step, f.Message)
	if f.RolledBack {
		s += " (rolled back to the last good release)"
	}
	return s
}

// Applier applies instances to one host.
type Applier struct {
	// Host is the root prefix of the host's filesystem.
	Host layout.Host
	// Systemd is a connection to the host's systemd.
	Systemd *systemd.Conn
	// Releases stages release tarballs into the host's releases folder.
	Releases *release.Store
	// ProcRoot is where the agent reads the host's /proc ("/proc" when it shares the host's PID
	// namespace).
	ProcRoot string
	// Launcher is the launch binary the agent installs at /opt/agent/_lib/launch.
	Launcher string
	// Python is the interpreter gateways run; unit.DefaultPython when empty.
	Python string
	// KeepReleases is how many releases stay on disk; 5 when zero.
	KeepReleases int
	// ProofTimeout bounds the wait for a restarted gateway to answer; 30s when zero.
	ProofTimeout time.Duration
	// BeforeStep, if set, is called before each step. Tests use it to interrupt an apply.
	BeforeStep func(Step)
	// Log receives one line per decision.
	Log logr.Logger

	scores map[string]string // exposure score by drop-in text, measured once
}

func (a *Applier) step(s Step) {
	if a.BeforeStep != nil {
		a.BeforeStep(s)
	}
}

func (a *Applier) users() users.Manager { return users.Manager{Root: a.Host.Root} }

func (a *Applier) python() string {
	if a.Python != "" {
		return a.Python
	}
	return unit.DefaultPython
}

// Apply brings one instance to the host and proves it. It returns a *Failure when the instance
// could not be brought up; the host then runs the last good release (or, if there was none, the
// unit is stopped).
func (a *Applier) Apply(ctx context.Context, in Instance) (*Outcome, error) {
	p, err := layout.ForProfile(in.Profile)
	if err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "InvalidName", Message: err.Error()}
	}
	if err := errors.Join(v1.ValidateSHA256(in.Release.SHA256), v1.ValidateReleaseLabel(in.Release.Label)); err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "BadArtifact", Message: err.Error()}
	}
	log := a.Log.WithValues("profile", p.Name, "release", in.Release.Label)

	a.step(StepPrepare)
	unitsChanged, err := a.prepareHost()
	if err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "HostSetupFailed", Message: err.Error(), Retry: true}
	}
	user, err := a.prepareProfile(p, in.Isolation)
	var conflict *users.ConflictError
	if errors.As(err, &conflict) {
		// Someone else's account: only a person can resolve it, and nothing of the profile was
		// touched.
		return nil, &Failure{Step: StepPrepare, Reason: "UserConflict", Message: err.Error()}
	}
	if err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "HostSetupFailed", Message: err.Error(), Retry: true}
	}

	a.step(StepStage)
	if _, err := a.Releases.Ensure(ctx, in.Release); err != nil {
		var rej *release.RejectedError
		if errors.As(err, &rej) {
			return nil, &Failure{Step: StepStage, Reason: rej.Reason, Message: rej.Message}
		}
		return nil, &Failure{Step: StepStage, Reason: "FetchFailed", Message: err.Error(), Retry: true}
	}
	target := Ref{SHA256: in.Release.SHA256, Label: in.Release.Label}

	want, err := a.render(p, in, target)
	if err != nil {
		return nil, &Failure{Step: StepWrite, Reason: "InvalidSpec", Message: err.Error()}
	}
	// What the host had before, to return to if this apply fails.
	before, _ := a.readRendered(p)
	lastGood := a.readLink(p.Dir + "/last-good")

	a.step(StepWrite)
	changed, err := a.writeRendered(p, want)
	if err != nil {
		return nil, &Failure{Step: StepWrite, Reason: "WriteFailed", Message: err.Error(), Retry: true}
	}
	if unitsChanged || changed.dropIn {
		if err := a.Systemd.Reload(ctx); err != nil {
			return nil, &Failure{Step: StepWrite, Reason: "ReloadFailed", Message: err.Error(), Retry: true}
		}
	}

	a.step(StepFlip)
	if err := a.flip(p, target); err != nil {
		return nil, a.rollback(ctx, log, p, in, user, lastGood, before, &Failure{Step: StepFlip, Reason: "FlipFailed", Message: err.Error()})
	}

	out := &Outcome{Current: target, ConfigHash: want.hash, User: user}
	expect := a.expect(p, target, want, user)
	// An instance already running exactly this is left alone: an apply repeated (after an agent
	// restart, say) must not restart a healthy gateway.
	proc := a.alreadyAligned(ctx, p, expect, in.DeniedTools)
	if proc != nil {
		log.V(1).Info("already aligned; not restarting", "mainPID", proc.PID)
	} else {
		a.step(StepRestart)
		siblings, err := a.restart(ctx, p)
		if err != nil {
			return nil, a.rollback(ctx, log, p, in, user, lastGood, before, &Failure{Step: StepRestart, Reason: "RestartFailed", Message: err.Error()})
		}
		out.Restarted = true

		a.step(StepProve)
		proc, err = a.prove(ctx, p, expect, in.DeniedTools, siblings)
		if err != nil {
			return nil, a.rollback(ctx, log, p, in, user, lastGood, before, &Failure{Step: StepProve, Reason: "ProofFailed", Message: err.Error()})
		}
		if err := a.probe(ctx, p, proc.PID, target.SHA256, in.Probe); err != nil {
			return nil, a.rollback(ctx, log, p, in, user, lastGood, before, &Failure{Step: StepProve, Reason: "ProbeFailed", Message: err.Error()})
		}
		log.Info("restarted and proven aligned", "mainPID", proc.PID)
	}
	out.MainPID = proc.PID
	out.Alignment = expect.record(proc)

	a.step(StepRecord)
	if err := renameio.Symlink(releaseLink(target), a.Host.On(p.Dir+"/last-good")); err != nil {
		return nil, &Failure{Step: StepRecord, Reason: "WriteFailed", Message: err.Error(), Retry: true}
	}
	out.LastGood = &target
	out.Isolation, out.Isolated = a.isolation(ctx, p, in.Isolation, want.dropIn, user)

	a.step(StepCollect)
	if err := a.collect(); err != nil {
		log.Error(err, "removing old releases")
	}
	return out, nil
}

// releaseLink is the target of a profile's `current` and `last-good` links: relative, so it
// resolves the same inside the host and under the agent's root prefix.
func releaseLink(r Ref) string {
	return path.Join("..", "..", "releases", r.SHA256+"-"+r.Label)
}

// parseReleaseLink reads a release back from a link target.
func parseReleaseLink(target string) *Ref {
	base := path.Base(target)
	if len(base) < 66 || base[64] != '-' {
		return nil
	}
	r := &Ref{SHA256: base[:64], Label: base[65:]}
	if v1.ValidateSHA256(r.SHA256) != nil || v1.ValidateReleaseLabel(r.Label) != nil {
		return nil
	}
	return r
}

func (a *Applier) readLink(inside string) *Ref {
	t, err := os.Readlink(a.Host.On(inside))
	if err != nil {
		return nil
	}
	return parseReleaseLink(t)
}

// flip points the profile's `current` at a release with one rename.
func (a *Applier) flip(p layout.Profile, r Ref) error {
	link := a.Host.On(p.Current)
	if t, err := os.Readlink(link); err == nil && t == releaseLink(r) {
		return nil
	}
	return renameio.Symlink(releaseLink(r), link)
}

// rendered is the text of every file written for one instance.
type rendered struct {
	env, dropIn, hash string
	settings          unit.Settings
}

func (a *Applier) settings(p layout.Profile, in Instance, r Ref) unit.Settings {
	return unit.Settings{
		Profile: p, Mode: in.Mode, Exec: in.Exec, Isolation: in.Isolation, Env: in.Env, Egress: in.Egress,
		ReleaseSHA256: r.SHA256, ReleaseLabel: r.Label, Python: a.python(),
	}
}

func (a *Applier) render(p layout.Profile, in Instance, r Ref) (*rendered, error) {
	s := a.settings(p, in, r)
	dropIn := unit.DropIn(s)
	env, err := unit.EnvFile(s)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(unit.Template() + dropIn + env))
	s.ConfigHash = hex.EncodeToString(sum[:])[:16]
	if env, err = unit.EnvFile(s); err != nil {
		return nil, err
	}
	return &rendered{env: env, dropIn: dropIn, hash: s.ConfigHash, settings: s}, nil
}

func (a *Applier) readRendered(p layout.Profile) (*rendered, error) {
	env, err := os.ReadFile(a.Host.On(p.Env))
	if err != nil {
		return nil, err
	}
	dropIn, err := os.ReadFile(a.Host.On(p.DropIn))
	if err != nil {
		return nil, err
	}
	return &rendered{env: string(env), dropIn: string(dropIn)}, nil
}

type changes struct{ env, dropIn bool }

func (a *Applier) writeRendered(p layout.Profile, r *rendered) (changes, error) {
	var c changes
	var err error
	if c.env, err = writeIfChanged(a.Host.On(p.Env), r.env, 0o644); err != nil {
		return c, err
	}
	if err := os.MkdirAll(a.Host.On(p.DropInDir), 0o755); err != nil {
		return c, err
	}
	if c.dropIn, err = writeIfChanged(a.Host.On(p.DropIn), r.dropIn, 0o644); err != nil {
		return c, err
	}
	return c, nil
}

// writeIfChanged writes a file atomically (temp file, fsync, rename) unless it already holds
// text, and reports whether it wrote.
func writeIfChanged(file, text string, mode os.FileMode) (bool, error) {
	if old, err := os.ReadFile(file); err == nil && string(old) == text {
		return false, nil
	}
	if err := renameio.WriteFile(file, []byte(text), mode); err != nil {
		return false, err
	}
	return true, nil
}

// prepareHost makes the shared part of the layout: folders, the launcher, the template unit, and
// the mask on the bare unit name. It reports whether any unit file changed.
func (a *Applier) prepareHost() (bool, error) {
	for _, d := range []string{layout.ReleasesDir, layout.GatewaysDir, path.Dir(layout.LauncherPath), layout.UnitDir} {
		if err := os.MkdirAll(a.Host.On(d), 0o755); err != nil {
			return false, err
		}
	}
	if a.Launcher != "" {
		bin, err := os.ReadFile(a.Launcher)
		if err != nil {
			return false, fmt.Errorf("read launcher: %w", err)
		}
		if _, err := writeIfChanged(a.Host.On(layout.LauncherPath), string(bin), 0o755); err != nil {
			return false, fmt.Errorf("install launcher: %w", err)
		}
	}
	changed, err := writeIfChanged(a.Host.On(path.Join(layout.UnitDir, layout.TemplateUnit)), unit.Template(), 0o644)
	if err != nil {
		return false, err
	}
	bare := a.Host.On(path.Join(layout.UnitDir, layout.BareUnit))
	if t, err := os.Readlink(bare); err != nil || t != "/dev/null" {
		if err := renameio.Symlink("/dev/null", bare); err != nil {
			return false, fmt.Errorf("mask %s: %w", layout.BareUnit, err)
		}
		changed = true
	}
	return changed, nil
}

// prepareProfile creates the profile's user and folders: home and logs owned by that user,
// home 0700 so no sibling can look in.
func (a *Applier) prepareProfile(p layout.Profile, iso v1.IsolationMode) (*users.User, error) {
	name, role := p.User, users.RoleProfile
	if iso == v1.IsolationConvenience {
		name, role = unit.SharedUser, users.RoleShared
	}
	u, err := a.users().Ensure(name, role)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(a.Host.On(p.Dir), 0o755); err != nil {
		return nil, err
	}
	for dir, mode := range map[string]os.FileMode{p.Home: 0o700, p.Logs: 0o750} {
		full := a.Host.On(dir)
		if err := os.MkdirAll(full, mode); err != nil {
			return nil, err
		}
		if err := os.Chmod(full, mode); err != nil {
			return nil, err
		}
		if err := chownTree(full, u.UID, u.GID); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// chownTree gives a folder and what is in it to a user, so a profile switched between
// isolation modes keeps access to its own state.
func chownTree(root string, uid, gid int) error {
	return filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
}

// collect removes releases beyond the newest KeepReleases, never one a profile's `current` or
// `last-good` points at.
func (a *Applier) collect() error {
	keep := a.KeepReleases
	if keep == 0 {
		keep = 5
	}
	entries, err := os.ReadDir(a.Host.On(layout.GatewaysDir))
	if err != nil {
		return err
	}
	var inUse []string
	for _, e := range entries {
		for _, link := range []string{"current", "last-good"} {
			if r := a.readLink(path.Join(layout.GatewaysDir, e.Name(), link)); r != nil {
				inUse = append(inUse, a.Host.On(layout.ReleaseDir(r.SHA256, r.Label)))
			}
		}
	}
	removed, err := a.Releases.GC(keep, inUse)
	if len(removed) > 0 {
		a.Log.Info("removed old releases", "releases", strings.Join(removed, ","))
	}
	return err
}
