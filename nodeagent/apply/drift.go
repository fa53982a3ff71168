package apply

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/drift"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

// inputs are the files an apply rendered for a profile, as drift compares them.
func (a *Applier) inputs(p layout.Profile, want *rendered, target Ref) map[string]string {
	in := map[string]string{
		p.Env:    drift.Digest([]byte(want.env)),
		p.DropIn: drift.Digest([]byte(want.dropIn)),
		path.Join(layout.UnitDir, layout.TemplateUnit): drift.Digest([]byte(unit.Template())),
		p.Current:                     drift.Link(releaseLink(target)),
		path.Join(p.Dir, "last-good"): drift.Link(releaseLink(target)),
	}
	if a.Launcher != "" {
		if b, err := os.ReadFile(a.Launcher); err == nil {
			in[layout.LauncherPath] = drift.Digest(b)
		}
	}
	return in
}

// Reprove proves the gateway that runs now without changing anything of the profile on the host:
// for a process systemd started again on its own from the files as rendered. It fails when no
// process runs, when `current` is not the instance's release, or when the process fails any
// check; the proven process is then recorded, so later applies leave it running.
func (a *Applier) Reprove(ctx context.Context, in Instance) (*Outcome, error) {
	p, err := layout.ForProfile(in.Profile)
	if err != nil {
		return nil, &Failure{Step: StepProve, Reason: "InvalidName", Message: err.Error()}
	}
	fail := func(reason string, err error) (*Outcome, error) {
		return nil, &Failure{Step: StepProve, Reason: reason, Message: err.Error()}
	}
	target := Ref{SHA256: in.Release.SHA256, Label: in.Release.Label}
	if cur := a.readLink(p.Current); cur == nil || *cur != target {
		return fail("ProofFailed", fmt.Errorf("%s does not point at release %s", p.Current, target.Label))
	}
	u, err := a.users().Lookup(a.userName(p, in))
	if err == nil && u == nil {
		err = fmt.Errorf("the user %s is gone", a.userName(p, in))
	}
	if err != nil {
		return fail("ProofFailed", err)
	}
	want, err := a.render(p, in, target)
	if err != nil {
		return fail("InvalidSpec", err)
	}
	proc, st, err := a.answered(ctx, p)
	if err != nil {
		return fail("ProofFailed", err)
	}
	e := a.expect(p, target, want, u)
	ev, err := a.check(ctx, p, e, in.DeniedTools, proc, nil, st)
	if err != nil {
		return fail("ProofFailed", err)
	}
	if err := a.writeProven(p, provenRecord{PID: proc.PID, StartTime: proc.StartTime, Hash: want.hash}); err != nil {
		return fail("WriteFailed", err)
	}
	out := &Outcome{Current: target, LastGood: a.readLink(path.Join(p.Dir, "last-good")), MainPID: proc.PID,
		Alignment: e.record(proc, ev), ConfigHash: want.hash, User: u, Inputs: a.inputs(p, want, target)}
	out.Isolation, out.Isolated, out.IsolationReason = a.isolation(ctx, p, want.settings, u)
	return out, nil
}

// answered waits, up to ProofTimeout, until the unit's main process answers on its status
// endpoint (a gateway systemd just started may not listen yet), and returns both.
func (a *Applier) answered(ctx context.Context, p layout.Profile) (*proof.Process, *proof.StatusReply, error) {
	timeout := a.ProofTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 500*time.Millisecond) {
		pid, err := a.Systemd.MainPID(ctx, p.Unit)
		if err == nil && pid == 0 {
			state, _ := a.Systemd.ActiveState(ctx, p.Unit)
			return nil, nil, fmt.Errorf("%s does not run (unit %s)", p.Unit, state)
		}
		if err == nil {
			// The process is read before it is asked: its start time pins down who must answer.
			var proc *proof.Process
			if proc, err = proof.ReadProcess(a.ProcRoot, pid); err == nil {
				var st *proof.StatusReply
				if st, err = proof.ReadStatus(ctx, a.Host, p); err == nil {
					return proc, st, nil
				}
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("the gateway did not answer on %s within %s: %v", p.StatusSocket, timeout, last)
		case <-time.After(delay):
		}
	}
}

func (a *Applier) userName(p layout.Profile, in Instance) string {
	if in.Isolation == v1.IsolationConvenience {
		return unit.SharedUser
	}
	return p.User
}

// SetAsideDropIns renames every drop-in the agent did not write in the drop-in folders of its
// own units (drift.OwnedDropInDirs) to <name>.drifted, which systemd does not read, and reloads
// systemd if it moved any. It returns the drop-ins it set aside. The text is kept for a person
// to look at; nothing is restarted here.
func (a *Applier) SetAsideDropIns(ctx context.Context, profile string) ([]string, error) {
	p, err := layout.ForProfile(profile)
	if err != nil {
		return nil, err
	}
	a.hostMu.Lock()
	defer a.hostMu.Unlock()
	var moved []string
	var errs []error
	for _, dir := range drift.OwnedDropInDirs(p) {
		entries, err := os.ReadDir(a.Host.On(dir))
		if err != nil {
			continue
		}
		for _, e := range entries {
			f := path.Join(dir, e.Name())
			if !strings.HasSuffix(e.Name(), ".conf") || f == p.DropIn {
				continue
			}
			// A rename inside a folder only root can write: the entry itself moves, link or not.
			if err := os.Rename(a.Host.On(f), a.Host.On(f)+".drifted"); err != nil {
				errs = append(errs, err)
				continue
			}
			moved = append(moved, f)
		}
	}
	if len(moved) > 0 {
		if err := a.Systemd.Reload(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return moved, errors.Join(errs...)
}

// Restage fetches a staged release again and swaps it in over its tree, which changed on the
// host (release.Store.Restage). Profiles staging the same release meanwhile wait for it.
func (a *Applier) Restage(ctx context.Context, art release.Artifact) error {
	unlock := a.lockRelease(Ref{SHA256: art.SHA256, Label: art.Label})
	defer unlock()
	_, err := a.Releases.Restage(ctx, art)
	return err
}
