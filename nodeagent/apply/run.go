package apply

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	"github.com/google/renameio/v2"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/isolation"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
)

// expectation is what a proof checks.
type expectation struct{ proof.Expect }

func (a *Applier) expect(p layout.Profile, r Ref, want *rendered, u *users.User) expectation {
	env := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(want.env))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.Contains(line, "=") {
			continue
		}
		k, v, _ := strings.Cut(line, "=")
		env[k] = unquote(v)
	}
	return expectation{Expect: proof.Expect{
		Profile: p, ReleaseDir: layout.ReleaseDir(r.SHA256, r.Label), SHA256: r.SHA256,
		Env: env, Python: a.python(), UID: u.UID,
	}}
}

// unquote reverses unit.EnvFile's quoting.
func unquote(v string) string {
	if len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' {
		return v
	}
	var b strings.Builder
	in := v[1 : len(v)-1]
	for i := 0; i < len(in); i++ {
		if in[i] == '\\' && i+1 < len(in) {
			i++
		}
		b.WriteByte(in[i])
	}
	return b.String()
}

// evidence is what a check found beyond the process itself.
type evidence struct {
	cgroup  string
	sysPath []string
}

// selfReported are the facts of a proof that the gateway process could forge once running.
var selfReported = []string{"environ", "cwd", "status"}

// record turns a process that passed every check into the proof reported in status.
func (e expectation) record(proc *proof.Process, ev evidence) v1.AlignmentProof {
	now := metav1.Now()
	first := func(k string) string {
		if v := proc.Lookup(k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return v1.AlignmentProof{
		StartTime: proc.StartTime, ControlGroup: ev.cgroup, SelfReported: selfReported, SysPath: ev.sysPath,
		PythonPath: first(unit.EnvPythonPath), RuntimePath: e.ReleaseDir, Exe: proc.Exe, Cwd: proc.Cwd,
		ReleaseSHA256: first(unit.EnvReleaseSHA), MaterialDigest: first(unit.EnvMaterialDigest), UnitClean: true, SiblingsUnchanged: true, CheckedAt: &now,
	}
}

// check runs every per-process proof against one main process. A unit view or a status reply
// already read for this process is used as is; nil ones are read here.
//
// The process is named by facts only root controls: systemd's MainPID, the kernel's start time
// for that PID (so a later process reusing the PID is not mistaken for it), its control group
// (the unit's own), and the kernel's record of who created the status socket (SO_PEERCRED),
// which must be a process of the same unit.
func (a *Applier) check(ctx context.Context, p layout.Profile, e expectation, denied []string, proc *proof.Process, uv *unitView, st *proof.StatusReply) (evidence, error) {
	var ev evidence
	if err := proof.Alignment(a.Host, a.ProcRoot, proc, e.Expect); err != nil {
		return ev, err
	}
	cg, err := a.Systemd.ControlGroup(ctx, p.Unit)
	if err != nil {
		return ev, err
	}
	if err := proof.InControlGroup(a.ProcRoot, int64(proc.PID), cg); err != nil {
		return ev, err
	}
	ev.cgroup = cg
	if uv == nil {
		if uv, err = a.readUnit(ctx, p); err != nil {
			return ev, err
		}
	}
	if err := proof.UnitClean(a.Host, uv.files, uv.env); err != nil {
		return ev, err
	}
	if st == nil {
		if st, err = proof.ReadStatus(ctx, a.Host, p); err != nil {
			return ev, fmt.Errorf("status endpoint: %w", err)
		}
	}
	// The peer's PID is in the agent's own PID namespace: read it from the agent's /proc.
	if err := proof.InControlGroup("/proc", int64(st.PeerPID), cg); err != nil {
		return ev, fmt.Errorf("the status socket's owner is not a process of %s: %w", p.Unit, err)
	}
	if err := proof.Status(&st.Status, proc.PID, p.Name, e.SHA256, denied); err != nil {
		return ev, err
	}
	if err := proof.ImportPath(st.Status.SysPath, p.Current, e.ReleaseDir); err != nil {
		return ev, err
	}
	ev.sysPath = st.Status.SysPath
	// Last: the PID must still name the process read at the start, not a successor.
	if now, err := proof.StartTime(a.ProcRoot, proc.PID); err != nil || now != proc.StartTime {
		return ev, fmt.Errorf("main process %d was replaced during its proof", proc.PID)
	}
	return ev, nil
}

// unitView is what systemd has loaded for a unit: every file it was built from (plus the
// drop-ins on disk, loaded or not) and its Environment=.
type unitView struct {
	files, env []string
}

func (a *Applier) readUnit(ctx context.Context, p layout.Profile) (*unitView, error) {
	files, err := a.Systemd.UnitFiles(ctx, p.Unit)
	if err != nil {
		return nil, err
	}
	files = append(files, proof.DropInFiles(a.Host, p.Unit)...)
	env, err := a.Systemd.Environment(ctx, p.Unit)
	if err != nil {
		return nil, err
	}
	return &unitView{files: files, env: env}, nil
}

// provenRecord is the process last proven for a profile, kept in the profile's root-owned
// folder: with it, an apply that changes nothing can tell the proven process from any other.
type provenRecord struct {
	PID       uint32 `json:"pid"`
	StartTime int64  `json:"startTime"`
	Hash      string `json:"hash"`
}

func (a *Applier) provenPath(p layout.Profile) string { return a.Host.On(path.Join(p.Dir, "proven")) }

func (a *Applier) writeProven(p layout.Profile, rec provenRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return renameio.WriteFile(a.provenPath(p), b, 0o600)
}

// stillProven returns the unit's main process if it is the very process proven for rendering
// hash (same PID, same kernel start time), or nil.
func (a *Applier) stillProven(ctx context.Context, p layout.Profile, hash string) *proof.Process {
	b, err := os.ReadFile(a.provenPath(p))
	if err != nil {
		return nil
	}
	var rec provenRecord
	if json.Unmarshal(b, &rec) != nil || rec.Hash != hash {
		return nil
	}
	pid, err := a.Systemd.MainPID(ctx, p.Unit)
	if err != nil || pid == 0 || pid != rec.PID {
		return nil
	}
	proc, err := proof.ReadProcess(a.ProcRoot, pid)
	if err != nil || proc.StartTime != rec.StartTime {
		return nil
	}
	return proc
}

// siblings are the other instances' main PIDs, with what this agent's other applies were doing
// to them, around one restart: an instance another apply restarted meanwhile (its restart
// count moved) or was restarting at either end (it was busy) is not a sibling this apply
// disturbed.
type siblings struct {
	pids     map[string]uint32
	restarts map[string]uint64
	busy     map[string]bool
}

func (a *Applier) snapshot(ctx context.Context) (siblings, error) {
	pids, err := a.Systemd.RunningInstances(ctx, layout.UnitPattern)
	if err != nil {
		return siblings{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	restarts := make(map[string]uint64, len(a.restarts))
	for u, n := range a.restarts {
		restarts[u] = n
	}
	busy := map[string]bool{}
	for u, n := range a.busy {
		busy[u] = n > 0
	}
	return siblings{pids: pids, restarts: restarts, busy: busy}, nil
}

// undisturbed checks that no sibling's main process changed between two snapshots, but for
// those another apply of this agent restarted in between.
func undisturbed(self string, before, after siblings) error {
	still := map[string]uint32{}
	for u, pid := range before.pids {
		if after.restarts[u] == before.restarts[u] && !before.busy[u] && !after.busy[u] {
			still[u] = pid
		}
	}
	return proof.Siblings(self, still, after.pids)
}

// restart restarts only the profile's unit and returns the siblings from before. The unit counts
// as busy for other applies' sibling checks until this run ends.
func (r *run) restartUnit() (siblings, error) {
	a := r.a
	before, err := a.snapshot(r.ctx)
	if err != nil {
		return siblings{}, err
	}
	a.mu.Lock()
	if a.restarts == nil {
		a.restarts, a.busy = map[string]uint64{}, map[string]int{}
	}
	a.restarts[r.p.Unit]++
	a.busy[r.p.Unit]++
	r.busy++
	a.mu.Unlock()
	ctx, p := r.ctx, r.p
	// A unit that failed before (a broken release, say) restarts at once, not after its limit.
	_ = a.Systemd.ResetFailed(ctx, p.Unit)
	if err := a.Systemd.Restart(ctx, p.Unit); err != nil {
		return siblings{}, err
	}
	if _, err := os.Lstat(a.Host.On(path.Join(layout.UnitDir, "multi-user.target.wants", p.Unit))); err != nil {
		if err := a.Systemd.Enable(ctx, p.Unit); err != nil {
			return siblings{}, err
		}
	}
	return before, nil
}

// prove waits for the restarted gateway to answer on its status endpoint, then checks it.
func (a *Applier) prove(ctx context.Context, p layout.Profile, e expectation, denied []string, before siblings) (*proof.Process, evidence, error) {
	timeout := a.ProofTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// The unit as loaded does not depend on the new process: read it while the gateway starts.
	uv, err := a.readUnit(ctx, p)
	if err != nil {
		return nil, evidence{}, err
	}
	var proc *proof.Process
	var st *proof.StatusReply
	var last error
	// Poll briskly: a gateway answers tens of milliseconds after its start, and every poll is
	// one D-Bus property read and one connect attempt (each bounded by proof.StatusTimeout).
	for delay := 5 * time.Millisecond; ; {
		pid, err := a.Systemd.MainPID(ctx, p.Unit)
		if err == nil && pid == 0 {
			state, _ := a.Systemd.ActiveState(ctx, p.Unit)
			return nil, evidence{}, fmt.Errorf("the gateway is not running after its restart (unit %s)", state)
		}
		if err == nil {
			// The process is read before it is asked: its start time pins down which process
			// the answer must come from.
			if proc, err = proof.ReadProcess(a.ProcRoot, pid); err == nil {
				if st, err = proof.ReadStatus(ctx, a.Host, p); err == nil {
					break
				}
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, evidence{}, fmt.Errorf("the gateway did not answer on %s within %s: %v", p.StatusSocket, timeout, last)
		case <-time.After(delay):
		}
	}
	ev, err := a.check(ctx, p, e, denied, proc, uv, st)
	if err != nil {
		return nil, ev, err
	}
	after, err := a.snapshot(ctx)
	if err != nil {
		return nil, ev, err
	}
	return proc, ev, undisturbed(p.Unit, before, after)
}

// probe asks the gateway for its status pr.Count times, pr.Period apart: the same main process
// must answer every time, from the intended release.
func (a *Applier) probe(ctx context.Context, p layout.Profile, pid uint32, sha string, pr Probe) error {
	for i := 0; i < pr.Count; i++ {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pr.Period):
		}
		now, err := a.Systemd.MainPID(ctx, p.Unit)
		if err != nil {
			return err
		}
		if now != pid {
			return fmt.Errorf("health probe %d of %d: the main process changed (%d -> %d): the gateway died after its start", i+1, pr.Count, pid, now)
		}
		st, err := proof.ReadStatus(ctx, a.Host, p)
		if err != nil {
			return fmt.Errorf("health probe %d of %d: %w", i+1, pr.Count, err)
		}
		if st.Status.PID != int(pid) || st.Status.ReleaseSHA != sha {
			return fmt.Errorf("health probe %d of %d: answered by pid %d on release %s", i+1, pr.Count, st.Status.PID, st.Status.ReleaseSHA)
		}
	}
	return nil
}

// rollback is the undo of an apply that failed after its flip: it returns the profile to its
// last good release and reports what then runs, with its proof. With no good release to return
// to, the unit is stopped rather than left crash-looping.
func (r *run) rollback(f *Failure) (*Outcome, error) {
	a, ctx, p, log := r.a, r.ctx, r.p, r.log
	if r.in.KeepFailed {
		log.Info("apply failed; autoRollback is off, so the host stays on this release", "step", f.Step, "reason", f.Message)
		f.Message += "; autoRollback is off: the host stays on this release for inspection"
		out := &Outcome{Current: r.target, ConfigHash: r.out.ConfigHash, User: r.user}
		out.MainPID, _ = a.Systemd.MainPID(ctx, p.Unit)
		return out, f
	}
	if r.lastGood == nil {
		log.Info("apply failed and there is no good release to return to; stopping the unit", "step", f.Step, "reason", f.Message)
		_ = a.Systemd.Stop(ctx, p.Unit)
		f.Message += "; no earlier release was proven on this host, so the unit is stopped"
		return &Outcome{User: r.user}, f
	}
	lastGood := *r.lastGood
	log.Info("apply failed; returning to the last good release", "step", f.Step, "reason", f.Message, "lastGood", lastGood.Label)
	fail := func(what string, err error) (*Outcome, error) {
		f.Message += "; " + what + ": " + err.Error()
		return nil, f
	}
	restore := r.before
	if restore == nil {
		// The files from before were lost (an earlier run was interrupted): render the last good
		// release with today's settings.
		re, err := a.render(p, r.in, lastGood)
		if err != nil {
			return fail("rollback failed", err)
		}
		restore = re
	}
	if _, err := a.writeRendered(p, restore); err != nil {
		return fail("rollback failed", err)
	}
	// The files from before go back with the env file from before. A re-rendered env file holds
	// today's secret values and digest, so today's files stay with it.
	if r.before != nil {
		// A drop-in of another isolation mode runs as another user: the home goes back to it.
		u := a.renderedUser(p, r.before, r.user)
		if u.UID != r.user.UID {
			if err := a.prepareProfile(p, u); err != nil {
				return fail("rollback failed", err)
			}
		}
		if r.materialBefore != nil {
			if err := a.restoreMaterial(p, u, *r.materialBefore); err != nil {
				return fail("rollback failed", err)
			}
		}
	}
	if err := a.reload(ctx); err != nil {
		return fail("rollback failed", err)
	}
	if _, err := a.flip(p, lastGood); err != nil {
		return fail("rollback failed", err)
	}
	before, err := r.restartUnit()
	if err != nil {
		return fail("rollback restart failed", err)
	}
	e := a.expect(p, lastGood, restore, r.user)
	e.UID = -1 // the restored drop-in may name the user of an earlier isolation mode
	proc, ev, err := a.prove(ctx, p, e, r.in.DeniedTools, before)
	if err != nil {
		return fail("the last good release "+lastGood.Label+" failed its proof too", err)
	}
	f.RolledBack = true
	hash := r.out.ConfigHash
	if restore.hash != "" {
		hash = restore.hash
	}
	out := &Outcome{Current: lastGood, LastGood: &lastGood, MainPID: proc.PID, Restarted: true,
		Alignment: e.record(proc, ev), ConfigHash: hash, User: r.user}
	return out, f
}

// isolation gathers the evidence behind the instance's Isolated condition on the host (see
// nodeagent/isolation): the unit's effective sandbox read back from systemd, a probe of the
// agent's own run as the profile's user inside that sandbox, and the exposure score. It returns
// the proof, whether every check held, and the reason for the condition.
func (a *Applier) isolation(ctx context.Context, p layout.Profile, s unit.Settings, u *users.User) (v1.IsolationProof, bool, string) {
	if s.Isolation == v1.IsolationConvenience {
		return v1.IsolationProof{User: u.Name, Message: "Convenience mode: every profile runs as the shared user " + u.Name +
			"; profiles are separated by folder only and are NOT isolated from each other"}, false, "Convenience"
	}
	a.mu.Lock()
	if a.verifier == nil {
		a.verifier = &isolation.Verifier{Systemd: a.Systemd, Host: a.Host}
	}
	v := a.verifier
	a.mu.Unlock()
	siblings, err := isolation.Siblings(a.Host, p.Name)
	var ev isolation.Evidence
	if err == nil {
		ev, err = v.Verify(ctx, p, s, siblings)
	}
	if err != nil {
		a.Log.Error(err, "gathering isolation evidence", "profile", p.Name)
		return v1.IsolationProof{User: u.Name, Message: "the isolation evidence could not be gathered: " + err.Error()}, false, "EvidenceUnavailable"
	}
	proof := v1.IsolationProof{User: u.Name, ExposureScore: ev.ExposureScore, Message: ev.Message()}
	for _, c := range ev.Checks {
		proof.Checks = append(proof.Checks, v1.IsolationCheck{Name: c.Name, Passed: c.Passed, Message: c.Message})
	}
	if !ev.Isolated {
		return proof, false, ev.Failed
	}
	return proof, true, "Verified"
}

// Remove stops and disables a profile's unit and removes its env file, links, drop-in,
// isolation probe and the files it wrote from Secrets and ConfigMaps. The rest of the home
// folder is kept unless purge is set. Removing an absent profile
// succeeds.
func (a *Applier) Remove(ctx context.Context, profile string, purge bool) error {
	p, err := layout.ForProfile(profile)
	if err != nil {
		return err
	}
	// Stopping a unit systemd does not know fails; that is fine, as long as nothing runs after.
	if err := a.Systemd.Stop(ctx, p.Unit); err != nil {
		a.Log.V(1).Info("stop before removal", "profile", p.Name, "result", err.Error())
	}
	if pid, err := a.Systemd.MainPID(ctx, p.Unit); err == nil && pid != 0 {
		return fmt.Errorf("%s still runs as pid %d after stop", p.Unit, pid)
	}
	if err := a.Systemd.Disable(ctx, p.Unit); err != nil {
		a.Log.V(1).Info("disable before removal", "profile", p.Name, "result", err.Error())
	}
	_ = a.Systemd.ResetFailed(ctx, p.Unit)
	// Secret files leave the host with the profile, even when its home is kept.
	if err := a.removeMaterial(p); err != nil {
		return err
	}
	for _, f := range []string{p.Current, p.Dir + "/last-good", p.Env, p.Material, path.Join(p.Dir, "proven")} {
		if err := os.Remove(a.Host.On(f)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	if err := os.RemoveAll(a.Host.On(p.DropInDir)); err != nil {
		return err
	}
	if err := isolation.Uninstall(a.Host, p.Name); err != nil {
		return err
	}
	if purge {
		for _, d := range []string{p.Home, p.Logs, p.Dir} {
			if err := os.RemoveAll(a.Host.On(d)); err != nil {
				return err
			}
		}
	}
	if err := a.reload(ctx); err != nil {
		return err
	}
	return a.collect()
}
