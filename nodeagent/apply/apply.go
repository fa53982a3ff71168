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
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/isolation"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/userfs"
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
var Steps = func() []Step {
	steps := make([]Step, len(plan))
	for i, s := range plan {
		steps[i] = s.step
	}
	return steps
}()

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
	// MemoryMax (bytes) and TasksMax cap the gateway's unit; zero means the API's default.
	MemoryMax, TasksMax int64
	// Files are written under the profile's home, owned by its user; MaterialDigest is the
	// digest of them and of Env's secret values (v1.ResolveMaterial), written into the env file.
	Files          []v1.MaterialFile
	MaterialDigest string
	// Restart restarts the unit and proves it again even when nothing changed: an operator's
	// restart request (a plugin change is picked up only by a restart).
	Restart bool
	// Heal puts back what was rendered after a change on the host, restarting the gateway only
	// when the proven process is gone or `current` moved under it (a running gateway imports
	// through `current`; what it read at start it has read already).
	Heal bool
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
	// Isolated is true when every isolation check gathered on the host held.
	Isolated bool
	// IsolationReason is the Isolated condition's reason: Verified, Convenience,
	// EvidenceUnavailable, or the name of the first check that failed.
	IsolationReason string
	// ConfigHash digests everything rendered for the instance.
	ConfigHash string
	// User is the user the gateway runs as.
	User *users.User
	// Inputs are the files rendered for the instance, as drift compares them: host path ->
	// drift.Digest of the text or drift.Link of the target.
	Inputs map[string]string
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

// Applier applies instances to one host. Applies of different profiles may run at once; an
// Applier serializes only the host-wide steps (shared files, daemon-reload, garbage collection).
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

	hostMu      sync.Mutex // host-wide steps: shared files, daemon-reload, GC
	mu          sync.Mutex // the fields below
	verifier    *isolation.Verifier
	staging     map[Ref]*sync.Mutex // one per release being staged
	restarts    map[string]uint64   // restarts this agent asked for, by unit
	busy        map[string]int      // applies restarting each unit now
	launcherSum string              // sha256 of the installed launcher
}

func (a *Applier) step(s Step) {
	if a.BeforeStep != nil {
		a.BeforeStep(s)
	}
}

func (a *Applier) users() users.Manager {
	return users.Manager{Root: a.Host.Root, HostTools: a.Host.HostTools}
}

func (a *Applier) python() string {
	if a.Python != "" {
		return a.Python
	}
	return unit.DefaultPython
}

// run is the state of one apply, threaded through its steps.
type run struct {
	a   *Applier
	ctx context.Context
	log logr.Logger
	in  Instance
	p   layout.Profile

	user   *users.User
	target Ref
	want   *rendered
	before *rendered // the profile's files before this apply, restored by the undo
	// materialBefore is the material record before this apply, restored by the undo; nil
	// until the write step replaced it.
	materialBefore *materialRecord
	lastGood       *Ref
	// changed is set when this apply changed anything the gateway reads at start (its env file,
	// units, the launcher, `current`): the running process then predates it and is restarted.
	changed bool
	// live is set when `current` moved: a running gateway sees that at once.
	live bool
	// undo, once set, returns the profile to its last good release after a failure.
	undo     func(*Failure) (*Outcome, error)
	busy     int // times this run marked its unit busy
	siblings siblings
	proc     *proof.Process
	out      Outcome
}

// plan is Apply's list of steps. Each step either completes or returns the failure to report;
// from the flip on, a failure runs the undo registered there.
var plan = []struct {
	step Step
	do   func(*run) *Failure
}{
	{StepPrepare, (*run).prepare},
	{StepStage, (*run).stage},
	{StepWrite, (*run).write},
	{StepFlip, (*run).flip},
	{StepRestart, (*run).restart},
	{StepProve, (*run).prove},
	{StepRecord, (*run).record},
	{StepCollect, (*run).collect},
}

// Apply brings one instance to the host and proves it. It returns a *Failure when the instance
// could not be brought up; the host then runs the last good release (or, if there was none, the
// unit is stopped). The Outcome always describes what the host actually runs: after a rollback,
// the last good release, its main PID and its proof.
func (a *Applier) Apply(ctx context.Context, in Instance) (*Outcome, error) {
	p, err := layout.ForProfile(in.Profile)
	if err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "InvalidName", Message: err.Error()}
	}
	if err := errors.Join(v1.ValidateSHA256(in.Release.SHA256), v1.ValidateReleaseLabel(in.Release.Label)); err != nil {
		return nil, &Failure{Step: StepPrepare, Reason: "BadArtifact", Message: err.Error()}
	}
	r := &run{a: a, ctx: ctx, in: in, p: p, log: a.Log.WithValues("profile", p.Name, "release", in.Release.Label),
		target: Ref{SHA256: in.Release.SHA256, Label: in.Release.Label}}
	defer func() {
		if r.busy > 0 {
			a.mu.Lock()
			a.busy[p.Unit] -= r.busy
			a.mu.Unlock()
		}
	}()
	for _, s := range plan {
		a.step(s.step)
		f := s.do(r)
		if f == nil {
			continue
		}
		f.Step = s.step
		if r.undo != nil {
			return r.undo(f)
		}
		return nil, f
	}
	return &r.out, nil
}

// prepare makes the profile's user, the host's shared layout and the profile's folders. The
// user comes first: an account the agent did not create stops the apply before anything on
// the host is written.
func (r *run) prepare() *Failure {
	var err error
	if r.user, err = r.a.ensureUser(r.p, r.in.Isolation); err != nil {
		var conflict *users.ConflictError
		if errors.As(err, &conflict) {
			// Someone else's account: only a person can resolve it.
			return &Failure{Reason: "UserConflict", Message: err.Error()}
		}
		return &Failure{Reason: "HostSetupFailed", Message: err.Error(), Retry: true}
	}
	r.out.User = r.user
	changed, err := r.a.prepareHost(r.ctx)
	if err != nil {
		return &Failure{Reason: "HostSetupFailed", Message: err.Error(), Retry: true}
	}
	r.changed = r.changed || changed
	if err := r.a.prepareProfile(r.p, r.user); err != nil {
		return &Failure{Reason: "HostSetupFailed", Message: err.Error(), Retry: true}
	}
	return nil
}

// stage downloads, verifies and unpacks the release, then renders the profile's files for it.
// Profiles applied at once may want the same release: one stages it, the others wait for it
// (a release's staging folder has one name).
func (r *run) stage() *Failure {
	unlock := r.a.lockRelease(r.target)
	_, err := r.a.Releases.Ensure(r.ctx, r.in.Release)
	unlock()
	if err != nil {
		var rej *release.RejectedError
		if errors.As(err, &rej) {
			return &Failure{Reason: rej.Reason, Message: rej.Message}
		}
		if errors.Is(err, syscall.ENOSPC) {
			msg := err.Error()
			if space, serr := r.a.StagingSpace(); serr == nil {
				msg += "; " + space.String()
			}
			return &Failure{Reason: "NoSpace", Message: msg, Retry: true}
		}
		return &Failure{Reason: "FetchFailed", Message: err.Error(), Retry: true}
	}
	want, err := r.a.render(r.p, r.in, r.target)
	if err != nil {
		return &Failure{Reason: "InvalidSpec", Message: err.Error()}
	}
	r.want = want
	r.out.ConfigHash = want.hash
	return nil
}

// write puts the env file and drop-in in place and reloads systemd if a unit changed.
func (r *run) write() *Failure {
	r.before, _ = r.a.readRendered(r.p)
	r.lastGood = r.a.readLink(r.p.Dir + "/last-good")
	changed, err := r.a.writeRendered(r.p, r.want)
	if err != nil {
		return &Failure{Reason: "WriteFailed", Message: err.Error(), Retry: true}
	}
	r.changed = r.changed || changed.env || changed.dropIn
	if r.materialBefore, err = r.a.writeMaterial(r.p, r.user, r.in.Files); err != nil {
		// Nothing runs the new files yet: put back the env file and the files from before, so
		// the gateway keeps what it started with and no new secret is left behind.
		msg := err.Error()
		if r.materialBefore != nil {
			u := r.user
			if r.before != nil {
				u = r.a.renderedUser(r.p, r.before, r.user)
			}
			if rerr := r.a.restoreMaterial(r.p, u, *r.materialBefore); rerr != nil {
				msg += "; restoring the previous files: " + rerr.Error()
			}
		}
		if r.before != nil {
			if _, rerr := r.a.writeRendered(r.p, r.before); rerr != nil {
				msg += "; restoring the previous env file: " + rerr.Error()
			}
		}
		return &Failure{Reason: "WriteFailed", Message: msg, Retry: true}
	}
	if changed.dropIn {
		if err := r.a.reload(r.ctx); err != nil {
			return &Failure{Reason: "ReloadFailed", Message: err.Error(), Retry: true}
		}
	}
	return nil
}

// flip points `current` at the release. From here on a failure returns to the last good release.
func (r *run) flip() *Failure {
	r.undo = r.rollback
	flipped, err := r.a.flip(r.p, r.target)
	if err != nil {
		return &Failure{Reason: "FlipFailed", Message: err.Error()}
	}
	r.changed = r.changed || flipped
	r.live = flipped
	return nil
}

// restart restarts the profile's unit, unless nothing it reads at start changed, no restart was
// asked for, and the process running is the very one proven for exactly this rendering (same
// PID and kernel start time): a repeated apply must not restart a healthy gateway, and a
// gateway cannot talk its way out of a restart by looking aligned.
func (r *run) restart() *Failure {
	if (!r.changed || (r.in.Heal && !r.live)) && !r.in.Restart {
		if proc := r.a.stillProven(r.ctx, r.p, r.want.hash); proc != nil {
			r.log.V(1).Info("the proven process still runs and nothing changed; not restarting", "mainPID", proc.PID)
			r.proc = proc
			return nil
		}
	}
	siblings, err := r.restartUnit()
	if err != nil {
		return &Failure{Reason: "RestartFailed", Message: err.Error()}
	}
	r.siblings = siblings
	r.out.Restarted = true
	return nil
}

// prove shows from root-controlled facts that the running process is the intended one; then
// the health probe, if asked for, watches it.
func (r *run) prove() *Failure {
	e := r.a.expect(r.p, r.target, r.want, r.user)
	if r.out.Restarted {
		proc, ev, err := r.a.prove(r.ctx, r.p, e, r.in.DeniedTools, r.siblings)
		if err != nil {
			return &Failure{Reason: "ProofFailed", Message: err.Error()}
		}
		r.proc = proc
		r.out.Alignment = e.record(proc, ev)
		if err := r.a.probe(r.ctx, r.p, proc.PID, r.target.SHA256, r.in.Probe); err != nil {
			return &Failure{Reason: "ProbeFailed", Message: err.Error()}
		}
		r.log.Info("restarted and proven aligned", "mainPID", proc.PID)
	} else {
		// The same process as proven before: check it again, as the periodic re-prove does.
		ev, err := r.a.check(r.ctx, r.p, e, r.in.DeniedTools, r.proc, nil, nil)
		if err != nil {
			return &Failure{Reason: "ProofFailed", Message: err.Error()}
		}
		r.out.Alignment = e.record(r.proc, ev)
	}
	r.out.Current = r.target
	r.out.MainPID = r.proc.PID
	return nil
}

// record remembers the proven process and the release as the profile's last good one. The
// release is proven: nothing is undone if recording fails, the next apply records it.
func (r *run) record() *Failure {
	r.undo = nil
	if err := r.a.writeProven(r.p, provenRecord{PID: r.proc.PID, StartTime: r.proc.StartTime, Hash: r.want.hash}); err != nil {
		return &Failure{Reason: "WriteFailed", Message: err.Error(), Retry: true}
	}
	if err := renameio.Symlink(releaseLink(r.target), r.a.Host.On(r.p.Dir+"/last-good")); err != nil {
		return &Failure{Reason: "WriteFailed", Message: err.Error(), Retry: true}
	}
	r.out.LastGood = &r.target
	r.out.Inputs = r.a.inputs(r.p, r.want, r.target)
	r.out.Isolation, r.out.Isolated, r.out.IsolationReason = r.a.isolation(r.ctx, r.p, r.want.settings, r.user)
	return nil
}

// collect removes old releases; a failure here is logged, never reported.
func (r *run) collect() *Failure {
	if err := r.a.collect(); err != nil {
		r.log.Error(err, "removing old releases")
	}
	return nil
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

// flip points the profile's `current` at a release with one rename, and reports whether it
// moved.
func (a *Applier) flip(p layout.Profile, r Ref) (bool, error) {
	link := a.Host.On(p.Current)
	if t, err := os.Readlink(link); err == nil && t == releaseLink(r) {
		return false, nil
	}
	return true, renameio.Symlink(releaseLink(r), link)
}

// rendered is the text of every file written for one instance.
type rendered struct {
	env, dropIn, hash string
	settings          unit.Settings
}

func (a *Applier) settings(p layout.Profile, in Instance) unit.Settings {
	return unit.Settings{
		Profile: p, Mode: in.Mode, Exec: in.Exec, Isolation: in.Isolation, Env: in.Env, Egress: in.Egress,
		Python: a.python(), MemoryMax: in.MemoryMax, TasksMax: in.TasksMax, MaterialDigest: in.MaterialDigest,
	}
}

// render renders the instance's files for a release. The hash covers everything a gateway
// reads at start: the template, the launcher, its drop-in, its env file and the release.
func (a *Applier) render(p layout.Profile, in Instance, r Ref) (*rendered, error) {
	s := a.settings(p, in)
	dropIn := unit.DropIn(s)
	env, err := unit.EnvFile(s)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	launcher := a.launcherSum
	a.mu.Unlock()
	sum := sha256.Sum256([]byte(unit.Template() + "\x00" + launcher + "\x00" + dropIn + "\x00" + env + "\x00" + r.SHA256 + "-" + r.Label))
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

// envMode keeps a profile's variables from every other user: systemd reads the file as root
// before it drops privileges, and no gateway, sibling or microVM user needs to.
const envMode = 0o600

func (a *Applier) writeRendered(p layout.Profile, r *rendered) (changes, error) {
	var c changes
	var err error
	if c.env, err = writeIfChanged(a.Host.On(p.Env), r.env, envMode); err != nil {
		return c, err
	}
	if err := os.MkdirAll(a.Host.On(p.DropInDir), 0o755); err != nil { //nolint:gosec // systemd unit folders are world-readable by convention
		return c, err
	}
	if c.dropIn, err = writeIfChanged(a.Host.On(p.DropIn), r.dropIn, 0o644); err != nil {
		return c, err
	}
	return c, nil
}

// writeIfChanged writes a root-owned file atomically (temp file, fsync, rename) unless it
// already holds text with mode, and reports whether its text changed.
func writeIfChanged(file, text string, mode os.FileMode) (bool, error) {
	if old, err := os.ReadFile(file); err == nil && string(old) == text { //nolint:gosec // root-owned files of the host layout
		fi, err := os.Lstat(file)
		if err != nil {
			return false, err
		}
		if fi.Mode().Perm() != mode {
			return false, os.Chmod(file, mode)
		}
		return false, nil
	}
	if err := renameio.WriteFile(file, []byte(text), mode); err != nil {
		return false, err
	}
	return true, nil
}

// lockRelease serializes the staging of one release; other releases stage meanwhile.
func (a *Applier) lockRelease(r Ref) (unlock func()) {
	a.mu.Lock()
	if a.staging == nil {
		a.staging = map[Ref]*sync.Mutex{}
	}
	m := a.staging[r]
	if m == nil {
		m = &sync.Mutex{}
		a.staging[r] = m
	}
	a.mu.Unlock()
	m.Lock()
	return m.Unlock
}

// reload runs daemon-reload; host-wide, so one at a time.
func (a *Applier) reload(ctx context.Context) error {
	a.hostMu.Lock()
	defer a.hostMu.Unlock()
	return a.Systemd.Reload(ctx)
}

// prepareHost makes the shared part of the layout: folders, the launcher, the template unit, and
// the mask on the bare unit name, reloading systemd when a unit changed. It reports whether
// anything a gateway reads at start changed.
func (a *Applier) prepareHost(ctx context.Context) (bool, error) {
	a.hostMu.Lock()
	defer a.hostMu.Unlock()
	for _, d := range []string{layout.ReleasesDir, layout.GatewaysDir, path.Dir(layout.LauncherPath), layout.UnitDir} {
		if err := os.MkdirAll(a.Host.On(d), 0o755); err != nil { //nolint:gosec // the shared layout is read by every gateway (DESIGN host layout)
			return false, err
		}
	}
	launcherChanged := false
	if a.Launcher != "" {
		bin, err := os.ReadFile(a.Launcher) //nolint:gosec // the agent's own --launcher flag
		if err != nil {
			return false, fmt.Errorf("read launcher: %w", err)
		}
		if launcherChanged, err = writeIfChanged(a.Host.On(layout.LauncherPath), string(bin), 0o755); err != nil {
			return false, fmt.Errorf("install launcher: %w", err)
		}
		sum := sha256.Sum256(bin)
		a.mu.Lock()
		a.launcherSum = hex.EncodeToString(sum[:])
		a.mu.Unlock()
	}
	unitsChanged, err := writeIfChanged(a.Host.On(path.Join(layout.UnitDir, layout.TemplateUnit)), unit.Template(), 0o644)
	if err != nil {
		return false, err
	}
	bare := a.Host.On(path.Join(layout.UnitDir, layout.BareUnit))
	if t, err := os.Readlink(bare); err != nil || t != "/dev/null" {
		if err := renameio.Symlink("/dev/null", bare); err != nil {
			return false, fmt.Errorf("mask %s: %w", layout.BareUnit, err)
		}
		unitsChanged = true
	}
	if unitsChanged {
		if err := a.Systemd.Reload(ctx); err != nil {
			return false, err
		}
	}
	return launcherChanged || unitsChanged, nil
}

// ensureUser returns the user the profile runs as, creating it if the agent never did:
// agent-<profile> in Production mode, the shared user in Convenience mode.
func (a *Applier) ensureUser(p layout.Profile, iso v1.IsolationMode) (*users.User, error) {
	name, role := p.User, users.RoleProfile
	if iso == v1.IsolationConvenience {
		name, role = unit.SharedUser, users.RoleShared
	}
	return a.users().Ensure(name, role)
}

// prepareProfile creates the profile's folders: home and logs owned by its user, home 0700 so
// no sibling can look in. The profile folder itself is root's; everything inside home and logs
// is the gateway's to change at any moment, so they are reached only through userfs
// (fd-relative, never following a symlink) and changed only where they are not as wanted.
func (a *Applier) prepareProfile(p layout.Profile, u *users.User) error {
	if err := os.MkdirAll(a.Host.On(p.Dir), 0o755); err != nil { //nolint:gosec // the profile folder is traversed by its gateway user
		return err
	}
	dir, err := userfs.OpenDir(a.Host.On(p.Dir))
	if err != nil {
		return err
	}
	defer dir.Close()
	owner := userfs.Owner{UID: u.UID, GID: u.GID}
	for _, d := range []struct {
		name string
		mode os.FileMode
	}{{path.Base(p.Home), 0o700}, {path.Base(p.Logs), 0o750}} {
		if err := userfs.EnsureDir(dir, d.name, d.mode, owner); err != nil {
			return err
		}
	}
	return nil
}

// collect removes releases beyond the newest KeepReleases, never one a profile's `current` or
// `last-good` points at.
func (a *Applier) collect() error {
	a.hostMu.Lock()
	defer a.hostMu.Unlock()
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
