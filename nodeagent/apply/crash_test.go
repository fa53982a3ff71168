package apply_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

const crashEnv = "GATEWAY_APPLY_CRASH"

// crashJob is what the parent test hands the crashing child.
type crashJob struct {
	Root, Bus, ProcRoot string
	Step                apply.Step
	Release             release.Artifact
}

// TestApplyCrashChild is not a test of its own: it is the agent the crash test SIGKILLs.
func TestApplyCrashChild(t *testing.T) {
	raw := os.Getenv(crashEnv)
	if raw == "" {
		return
	}
	var job crashJob
	if err := json.Unmarshal([]byte(raw), &job); err != nil {
		t.Fatal(err)
	}
	h := &systemdhost.Host{Root: job.Root, BusAddress: job.Bus}
	a := &apply.Applier{
		Host: layout.Host{Root: job.Root}, Systemd: h.Dial(t),
		Releases: &release.Store{Dir: filepath.Join(job.Root, "opt/agent/releases")},
		ProcRoot: job.ProcRoot, Launcher: launchBin,
		BeforeStep: func(s apply.Step) {
			if s == job.Step {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		},
	}
	_, err := a.Apply(context.Background(), instance("core", job.Release))
	t.Fatalf("apply ran to its end without reaching step %s: %v", job.Step, err)
}

// TestSIGKILLBetweenSteps kills the agent (a real process, SIGKILL) before every step of an
// apply. After each kill, `current` must point at a complete release; a restarted agent must
// then converge on the intended release.
func TestSIGKILLBetweenSteps(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	releases := []release.Artifact{
		f.publish(agentruntime.Options{Version: "1.0.0"}),
		f.publish(agentruntime.Options{Version: "2.0.0"}),
	}
	f.mustApply(instance("core", releases[0]))
	f.mustApply(instance("api", releases[0]))
	apiPID := f.mainPID("api")

	for i, step := range apply.Steps {
		target := releases[(i+1)%2]
		t.Run(string(step), func(t *testing.T) {
			job, _ := json.Marshal(crashJob{Root: f.host.Root, Bus: f.host.BusAddress,
				ProcRoot: f.applier.ProcRoot, Step: step, Release: target})
			cmd := exec.Command(os.Args[0], "-test.run=^TestApplyCrashChild$")
			cmd.Env = append(os.Environ(), crashEnv+"="+string(job))
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("the agent was not killed at %s: %v\n%s", step, err, out)
			}
			assertCurrentComplete(t, f.host.Root, "core")
			// Anyone may restart the unit now (an operator, systemd's Restart=): whatever step
			// the agent died at, the gateway must start, on the old or the new release.
			restartByHand(t, f, "core")

			got := f.mustApply(instance("core", target))
			f.assertServes("core", target)
			if got.MainPID == 0 {
				t.Error("no main PID after convergence")
			}
		})
	}
	if got := f.mainPID("api"); got != apiPID {
		t.Errorf("the crashed applies of core restarted api (%d -> %d)", apiPID, got)
	}
}

// assertCurrentComplete checks that a profile's `current` resolves to a whole, renamed-in
// release tree.
func assertCurrentComplete(t *testing.T, root, profile string) {
	t.Helper()
	link := filepath.Join(root, "opt/agent/gateways", profile, "current")
	target, err := os.Readlink(link)
	if err != nil {
		t.Fatalf("current: %v", err)
	}
	dir := filepath.Join(filepath.Dir(link), target)
	base := filepath.Base(dir)
	if filepath.Ext(base) == ".tmp" || len(base) < 66 {
		t.Fatalf("current -> %s, not a release folder", target)
	}
	if _, err := os.Stat(filepath.Join(dir, "agent_cli", "release.json")); err != nil {
		t.Fatalf("current -> %s, an incomplete tree: %v", target, err)
	}
}

// restartByHand restarts a profile's unit with systemctl, as an operator would, and checks that
// the gateway starts and answers from a release folder.
func restartByHand(t *testing.T, f *fixture, profile string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	unitName := layout.Unit(profile)
	if out, err := f.host.Systemctl(ctx, "restart", unitName); err != nil {
		t.Fatalf("systemctl restart %s after the crash: %v\n%s\n%s", unitName, err, out, f.host.Journal(unitName))
	}
	for {
		st, err := agentruntime.GetStatus(ctx, filepath.Join(f.host.Root, "opt/agent/gateways", profile, "home/run/status.sock"))
		if err == nil {
			if st.PID != int(f.mainPID(profile)) || len(st.ReleaseSHA) != 64 {
				t.Fatalf("after a restart by hand %s answers as pid %d on release %q", profile, st.PID, st.ReleaseSHA)
			}
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s did not come back after a restart by hand: %v\n%s", profile, err, f.host.Journal(unitName))
		case <-time.After(50 * time.Millisecond):
		}
	}
}
