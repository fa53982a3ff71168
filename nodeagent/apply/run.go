package apply

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
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

// record turns a process that passed every check into the proof reported in status.
func (e expectation) record(proc *proof.Process) v1.AlignmentProof {
	now := metav1.Now()
	first := func(k string) string {
		if v := proc.Lookup(k); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return v1.AlignmentProof{
		PythonPath: first(unit.EnvPythonPath), RuntimePath: e.ReleaseDir, Exe: proc.Exe, Cwd: proc.Cwd,
		ReleaseSHA256: first(unit.EnvReleaseSHA), UnitClean: true, SiblingsUnchanged: true, CheckedAt: &now,
	}
}

// alreadyAligned returns the running main process when the unit already runs exactly what is
// expected, or nil.
func (a *Applier) alreadyAligned(ctx context.Context, p layout.Profile, e expectation, denied []string) *proof.Process {
	pid, err := a.Systemd.MainPID(ctx, p.Unit)
	if err != nil || pid == 0 {
		return nil
	}
	proc, err := a.check(ctx, p, e, denied, pid, nil, nil)
	if err != nil {
		a.Log.V(1).Info("running instance is not aligned", "profile", p.Name, "reason", err.Error())
		return nil
	}
	return proc
}

// check runs every per-process proof against one main PID. A unit view or a status already read
// for this PID is used as is; nil ones are read here.
func (a *Applier) check(ctx context.Context, p layout.Profile, e expectation, denied []string, pid uint32, uv *unitView, st *proof.GatewayStatus) (*proof.Process, error) {
	proc, err := proof.ReadProcess(a.ProcRoot, pid)
	if err != nil {
		return nil, err
	}
	if err := proof.Alignment(a.Host, a.ProcRoot, proc, e.Expect); err != nil {
		return nil, err
	}
	if uv == nil {
		if uv, err = a.readUnit(ctx, p); err != nil {
			return nil, err
		}
	}
	if err := proof.UnitClean(a.Host, uv.files, uv.env); err != nil {
		return nil, err
	}
	if st == nil {
		if st, _, err = proof.ReadStatus(ctx, a.Host.On(p.StatusSocket)); err != nil {
			return nil, fmt.Errorf("status endpoint: %w", err)
		}
	}
	return proc, proof.Status(st, pid, p.Name, e.SHA256, denied)
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

// restart restarts only the profile's unit and returns the siblings' main PIDs from before.
func (a *Applier) restart(ctx context.Context, p layout.Profile) (map[string]uint32, error) {
	siblings, err := a.Systemd.RunningInstances(ctx, layout.UnitPattern)
	if err != nil {
		return nil, err
	}
	// A unit that failed before (a broken release, say) restarts at once, not after its limit.
	_ = a.Systemd.ResetFailed(ctx, p.Unit)
	if err := a.Systemd.Restart(ctx, p.Unit); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(a.Host.On(path.Join(layout.UnitDir, "multi-user.target.wants", p.Unit))); err != nil {
		if err := a.Systemd.Enable(ctx, p.Unit); err != nil {
			return nil, err
		}
	}
	return siblings, nil
}

// prove waits for the restarted gateway to answer on its status endpoint, then checks it.
func (a *Applier) prove(ctx context.Context, p layout.Profile, e expectation, denied []string, before map[string]uint32) (*proof.Process, error) {
	timeout := a.ProofTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// The unit as loaded does not depend on the new process: read it while the gateway starts.
	uv, err := a.readUnit(ctx, p)
	if err != nil {
		return nil, err
	}
	var pid uint32
	var st *proof.GatewayStatus
	var last error
	// Poll briskly: a gateway answers tens of milliseconds after its start, and every poll is
	// one D-Bus property read and one connect attempt.
	for delay := 5 * time.Millisecond; ; {
		var err error
		pid, err = a.Systemd.MainPID(ctx, p.Unit)
		if err == nil && pid == 0 {
			state, _ := a.Systemd.ActiveState(ctx, p.Unit)
			return nil, fmt.Errorf("the gateway is not running after its restart (unit %s)", state)
		}
		if err == nil {
			st, _, err = proof.ReadStatus(ctx, a.Host.On(p.StatusSocket))
			if err == nil {
				break
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the gateway did not answer on %s within %s: %v", p.StatusSocket, timeout, last)
		case <-time.After(delay):
		}
	}
	proc, err := a.check(ctx, p, e, denied, pid, uv, st)
	if err != nil {
		return nil, err
	}
	after, err := a.Systemd.RunningInstances(ctx, layout.UnitPattern)
	if err != nil {
		return nil, err
	}
	return proc, proof.Siblings(p.Unit, before, after)
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
		st, _, err := proof.ReadStatus(ctx, a.Host.On(p.StatusSocket))
		if err != nil {
			return fmt.Errorf("health probe %d of %d: %w", i+1, pr.Count, err)
		}
		if st.PID != int(pid) || st.ReleaseSHA != sha {
			return fmt.Errorf("health probe %d of %d: answered by pid %d on release %s", i+1, pr.Count, st.PID, st.ReleaseSHA)
		}
	}
	return nil
}

// rollback returns the profile to its last good release after a failed step, and returns the
// failure to report. With no good release to return to, the unit is stopped rather than left
// crash-looping.
func (a *Applier) rollback(ctx context.Context, log logr.Logger, p layout.Profile, in Instance, u *users.User, lastGood *Ref, before *rendered, f *Failure) error {
	if in.KeepFailed {
		log.Info("apply failed; autoRollback is off, so the host stays on this release", "step", f.Step, "reason", f.Message)
		f.Message += "; autoRollback is off: the host stays on this release for inspection"
		return f
	}
	if lastGood == nil {
		log.Info("apply failed and there is no good release to return to; stopping the unit", "step", f.Step, "reason", f.Message)
		_ = a.Systemd.Stop(ctx, p.Unit)
		f.Message += "; no earlier release was proven on this host, so the unit is stopped"
		return f
	}
	log.Info("apply failed; returning to the last good release", "step", f.Step, "reason", f.Message, "lastGood", lastGood.Label)
	restore := before
	if restore == nil || !strings.Contains(restore.env, lastGood.SHA256) {
		// The files from before were lost (an earlier run was interrupted): render the last good
		// release with today's settings.
		r, err := a.render(p, in, *lastGood)
		if err != nil {
			f.Message += "; rollback failed: " + err.Error()
			return f
		}
		restore = r
	}
	if _, err := a.writeRendered(p, restore); err != nil {
		f.Message += "; rollback failed: " + err.Error()
		return f
	}
	if err := a.Systemd.Reload(ctx); err != nil {
		f.Message += "; rollback failed: " + err.Error()
		return f
	}
	if err := a.flip(p, *lastGood); err != nil {
		f.Message += "; rollback failed: " + err.Error()
		return f
	}
	siblings, err := a.restart(ctx, p)
	if err != nil {
		f.Message += "; rollback restart failed: " + err.Error()
		return f
	}
	e := a.expect(p, *lastGood, restore, u)
	e.UID = -1 // the restored drop-in may name the user of an earlier isolation mode
	if _, err := a.prove(ctx, p, e, in.DeniedTools, siblings); err != nil {
		f.Message += "; the last good release " + lastGood.Label + " failed its proof too: " + err.Error()
		return f
	}
	f.RolledBack = true
	return f
}

var exposureRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9]+\.[0-9]+)`)

// isolation reports how the instance is sandboxed. The exposure score is measured by
// `systemd-analyze security` once per distinct drop-in.
func (a *Applier) isolation(ctx context.Context, p layout.Profile, iso v1.IsolationMode, dropIn string, u *users.User) (v1.IsolationProof, bool) {
	if iso == v1.IsolationConvenience {
		return v1.IsolationProof{User: u.Name, Message: "Convenience mode: every profile runs as the shared user " + u.Name +
			"; profiles are separated by folder only and are NOT isolated from each other"}, false
	}
	if a.scores == nil {
		a.scores = map[string]string{}
	}
	score, ok := a.scores[dropIn]
	if !ok {
		var err error
		score, err = a.exposure(ctx, p.Unit)
		if err != nil {
			a.Log.Error(err, "measuring the unit's exposure", "profile", p.Name)
		} else {
			a.scores[dropIn] = score
		}
	}
	return v1.IsolationProof{User: u.Name, ExposureScore: score,
		Message: "Production mode: own user " + u.Name + ", read-only system, no capabilities, IP traffic denied but for the allowlist"}, true
}

// exposure runs `systemd-analyze security` on the unit files under the root prefix.
func (a *Applier) exposure(ctx context.Context, unitName string) (string, error) {
	// A fixed binary and a validated unit name, without a shell.
	cmd := exec.CommandContext(ctx, "systemd-analyze", "security", "--offline=yes", "--root="+a.Host.Root, "--no-pager", unitName) //nolint:gosec // see above
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0")
	out, err := cmd.CombinedOutput()
	m := exposureRE.FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("systemd-analyze security %s: %v: %s", unitName, err, lastLine(out))
	}
	return string(m[1]), nil
}

func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

// Remove stops and disables a profile's unit and removes its env file, links and drop-in.
// The home folder is kept unless purge is set. Removing an absent profile succeeds.
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
	for _, f := range []string{p.Current, p.Dir + "/last-good", p.Env} {
		if err := os.Remove(a.Host.On(f)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	if err := os.RemoveAll(a.Host.On(p.DropInDir)); err != nil {
		return err
	}
	if purge {
		for _, d := range []string{p.Home, p.Logs, p.Dir} {
			if err := os.RemoveAll(a.Host.On(d)); err != nil {
				return err
			}
		}
	}
	if err := a.Systemd.Reload(ctx); err != nil {
		return err
	}
	return a.collect()
}
