package apply_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// TestPromoteOneProfileLeavesSiblingAlone runs two profiles on different releases on one real
// systemd host, promotes one, then rolls it back: only that profile's process changes.
func TestPromoteOneProfileLeavesSiblingAlone(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})

	core := f.mustApply(instance("core", r1))
	api := f.mustApply(instance("api", r2))
	if !core.Restarted || !api.Restarted {
		t.Fatal("first applies must start the units")
	}
	f.assertServes("core", r1)
	f.assertServes("api", r2)
	for _, o := range []*apply.Outcome{core, api} {
		if o.Alignment.PythonPath == "" || !o.Alignment.UnitClean || !o.Alignment.SiblingsUnchanged {
			t.Errorf("proof incomplete: %+v", o.Alignment)
		}
	}
	if core.Alignment.Cwd != layout.ReleaseDir(r1.SHA256, r1.Label) && core.Alignment.Cwd != f.host.Root+layout.ReleaseDir(r1.SHA256, r1.Label) {
		t.Errorf("core's cwd %s is not its release folder", core.Alignment.Cwd)
	}
	apiPID := f.mainPID("api")

	promoted := f.mustApply(instance("core", r2))
	if !promoted.Restarted || promoted.MainPID == core.MainPID {
		t.Errorf("promotion did not restart core (pid %d -> %d)", core.MainPID, promoted.MainPID)
	}
	f.assertServes("core", r2)
	if got := f.mainPID("api"); got != apiPID {
		t.Errorf("promoting core restarted api: pid %d -> %d", apiPID, got)
	}

	back := f.mustApply(instance("core", r1))
	if !back.Restarted {
		t.Error("rollback did not restart core")
	}
	f.assertServes("core", r1)
	if got := f.mainPID("api"); got != apiPID {
		t.Errorf("rolling core back restarted api: pid %d -> %d", apiPID, got)
	}
	// Both releases stay on disk: one is current, the other is fast to return to.
	for _, r := range []string{r1.SHA256 + "-1.0.0", r2.SHA256 + "-2.0.0"} {
		if _, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/releases", r)); err != nil {
			t.Errorf("release %s was removed: %v", r, err)
		}
	}
}

// TestApplyIsIdempotent: applying what already runs restarts nothing.
func TestApplyIsIdempotent(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	first := f.mustApply(instance("core", r1))
	again := f.mustApply(instance("core", r1))
	if again.Restarted || again.MainPID != first.MainPID {
		t.Errorf("second apply restarted core (pid %d -> %d)", first.MainPID, again.MainPID)
	}
	if n := f.server.Requests("1.0.0.tar.gz"); n != 1 {
		t.Errorf("release fetched %d times, want once", n)
	}
	// A changed setting reaches the process: the env file changes, so the unit restarts.
	in := instance("core", r1)
	in.Env = []v1.EnvVar{{Name: "TZ", Value: "UTC"}}
	changed := f.mustApply(in)
	if !changed.Restarted {
		t.Error("a changed env did not restart core")
	}
}

// TestWrongDigestKeepsRunningRelease: a release whose sha256 does not match is refused before
// anything changes; the running release keeps serving.
func TestWrongDigestKeepsRunningRelease(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	f.mustApply(instance("core", r1))
	pid := f.mainPID("core")

	bad := r2
	bad.SHA256 = strings.Repeat("0", 64)
	_, err := f.applier.Apply(context.Background(), instance("core", bad))
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.Reason != "DigestMismatch" || fail.Step != apply.StepStage {
		t.Fatalf("apply with a wrong sha256: %v, want a DigestMismatch failure at stage", err)
	}
	if fail.Retry {
		t.Error("a digest mismatch is marked retryable")
	}
	f.assertServes("core", r1)
	if got := f.mainPID("core"); got != pid {
		t.Errorf("core was restarted (pid %d -> %d)", pid, got)
	}
	entries, _ := os.ReadDir(filepath.Join(f.host.Root, "opt/agent/releases"))
	if len(entries) != 1 {
		t.Errorf("releases folder holds %d entries after a refused release, want 1", len(entries))
	}
}

// TestBrokenReleaseRollsBack: a release whose runtime exits at start fails its proof; the
// profile returns to the last good release and serves again.
func TestBrokenReleaseRollsBack(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	broken := f.publish(agentruntime.Options{Version: "2.0.0-broken", CrashAtStart: true})
	f.mustApply(instance("core", r1))

	_, err := f.applier.Apply(context.Background(), instance("core", broken))
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.Step != apply.StepProve || !fail.RolledBack {
		t.Fatalf("apply of a broken release: %v, want a rolled-back proof failure", err)
	}
	t.Logf("reported: %v", fail)
	f.assertServes("core", r1)

	// With no good release to return to, the unit is stopped rather than left crash-looping.
	_, err = f.applier.Apply(context.Background(), instance("fresh", broken))
	if !errors.As(err, &fail) || fail.RolledBack || !strings.Contains(fail.Message, "unit is stopped") {
		t.Fatalf("first apply of a broken release: %v", err)
	}
	state, _ := f.applier.Systemd.ActiveState(context.Background(), layout.Unit("fresh"))
	if state == "active" || state == "activating" {
		t.Errorf("fresh's unit is %s, want stopped", state)
	}
}

// TestScriptMode runs a profile through `python <exec>`.
func TestScriptMode(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	in := instance("mcp", r1)
	in.Mode, in.Exec = v1.EntrypointScript, "gateways/script.py"
	f.mustApply(in)
	if st := f.status("mcp"); st.Mode != "script" {
		t.Errorf("mcp runs in mode %q, want script", st.Mode)
	}
}

// TestDeniedToolFailsProof: a gateway that loads a tool its profile denies is not aligned.
func TestDeniedToolFailsProof(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0", Tools: []string{"search", "shell"}})
	in := instance("core", r1)
	in.DeniedTools = []string{"shell"}
	_, err := f.applier.Apply(context.Background(), in)
	if err == nil || !strings.Contains(err.Error(), `denied tool "shell" is loaded`) {
		t.Fatalf("apply with a denied tool loaded: %v", err)
	}
}

// TestPythonPathLint: a drop-in someone else adds that sets PYTHONPATH fails the proof, and the
// report names the file.
func TestPythonPathLint(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	f.mustApply(instance("core", r1))
	stray := filepath.Join(f.host.Root, "etc/systemd/system/agent-gateway@core.service.d/10-local.conf")
	if err := os.WriteFile(stray, []byte("[Service]\nEnvironment=PYTHONPATH=/srv/old-runtime\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := f.applier.Apply(context.Background(), instance("core", r2))
	if err == nil || !strings.Contains(err.Error(), "10-local.conf mentions PYTHONPATH") {
		t.Fatalf("apply with a stray PYTHONPATH drop-in: %v", err)
	}
}

// TestProductionIsolationIsEnforced checks from inside the running gateways that Production
// hardening really holds on a real systemd: own user, /etc read-only, a sibling's home
// unreadable, IP traffic denied but for the allowlist; and that the exposure score is <= 2.0.
func TestProductionIsolationIsEnforced(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	target := v1.EnvVar{Name: "PROBE_CONNECT", Value: ln.Addr().String()}
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})

	denied := instance("core", r1)
	denied.Env = []v1.EnvVar{target}
	out := f.mustApply(denied)
	allowed := instance("api", r1)
	allowed.Env = []v1.EnvVar{target}
	allowed.Egress = []string{"127.0.0.1"}
	f.mustApply(allowed)
	// core started before api had a home; restart it so its probe sees a sibling.
	if _, err := f.host.Systemctl(context.Background(), "restart", "agent-gateway@core.service"); err != nil {
		t.Fatal(err)
	}
	f.mustApply(denied)

	if !out.Isolated || out.Isolation.User != "agent-core" {
		t.Errorf("isolation = %+v, want Production as agent-core", out.Isolation)
	}
	score, err := strconv.ParseFloat(out.Isolation.ExposureScore, 64)
	if err != nil || score > 2.0 {
		t.Errorf("exposure score %q, want <= 2.0", out.Isolation.ExposureScore)
	}
	t.Logf("systemd-analyze security exposure: %s", out.Isolation.ExposureScore)

	core, api := f.status("core"), f.status("api")
	if core.UID == 0 || core.UID == api.UID {
		t.Errorf("core runs as uid %d, api as %d: want two distinct unprivileged users", core.UID, api.UID)
	}
	for name, st := range map[string]*agentruntime.Status{"core": core, "api": api} {
		if !strings.HasPrefix(st.Probes["write_etc"], "denied") {
			t.Errorf("%s could write /etc: %s", name, st.Probes["write_etc"])
		}
		if !strings.HasPrefix(st.Probes["read_sibling_home"], "denied: Permission") {
			t.Errorf("%s reading a sibling's home: %s", name, st.Probes["read_sibling_home"])
		}
	}
	if !strings.HasPrefix(core.Probes["connect"], "denied") {
		t.Errorf("core (no allowlist) reached %s: %s", target.Value, core.Probes["connect"])
	}
	if api.Probes["connect"] != "allowed" {
		t.Errorf("api (allowlist 127.0.0.1) could not reach %s: %s", target.Value, api.Probes["connect"])
	}
	sock, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/gateways/core/home/run/status.sock"))
	if err != nil || sock.Mode().Perm() != 0o600 {
		t.Errorf("core's status socket: %v mode %v, want 0600", err, sock.Mode().Perm())
	}
	home, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/gateways/core/home"))
	if err != nil || home.Mode().Perm() != 0o700 {
		t.Errorf("core's home: %v mode %v, want 0700", err, home.Mode().Perm())
	}
}

// TestConvenienceModeSaysNotIsolated: Convenience runs as the shared user and says so.
func TestConvenienceModeSaysNotIsolated(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	in := instance("dev", r1)
	in.Isolation = v1.IsolationConvenience
	out := f.mustApply(in)
	if out.Isolated || out.Isolation.User != "agent" || !strings.Contains(out.Isolation.Message, "NOT isolated") {
		t.Errorf("convenience isolation = %+v", out.Isolation)
	}
}

// TestRemoveKeepsHomeAndSiblings: removing a profile stops and disables its unit and removes
// its env and links; its home stays unless purged; siblings keep running.
func TestRemoveKeepsHomeAndSiblings(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	f.mustApply(instance("core", r1))
	f.mustApply(instance("api", r1))
	corePID := f.mainPID("core")
	ctx := context.Background()

	if err := f.applier.Remove(ctx, "api", false); err != nil {
		t.Fatal(err)
	}
	if pid := f.mainPID("api"); pid != 0 {
		t.Errorf("api still runs as %d", pid)
	}
	for _, gone := range []string{"opt/agent/gateways/api/env", "opt/agent/gateways/api/current",
		"etc/systemd/system/agent-gateway@api.service.d", "etc/systemd/system/multi-user.target.wants/agent-gateway@api.service"} {
		if _, err := os.Lstat(filepath.Join(f.host.Root, gone)); err == nil {
			t.Errorf("%s survived removal", gone)
		}
	}
	if _, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/gateways/api/home")); err != nil {
		t.Errorf("api's home was removed without purge: %v", err)
	}
	if got := f.mainPID("core"); got != corePID {
		t.Errorf("removing api restarted core (%d -> %d)", corePID, got)
	}
	if err := f.applier.Remove(ctx, "api", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/gateways/api")); err == nil {
		t.Error("purge left api's folder")
	}
	if err := f.applier.Remove(ctx, "api", false); err != nil {
		t.Errorf("removing an absent profile: %v", err)
	}
}

// TestBareUnitCannotStart: neither agent-gateway.service nor the template without an instance
// can be started.
func TestBareUnitCannotStart(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	f.mustApply(instance("core", f.publish(agentruntime.Options{Version: "1.0.0"})))
	for _, u := range []string{"agent-gateway.service", "agent-gateway@.service"} {
		if out, err := f.host.Systemctl(context.Background(), "start", u); err == nil {
			t.Errorf("systemctl start %s succeeded: %s", u, out)
		}
	}
}

// TestRefusesInvalidNames: names that could escape a path are refused before any use.
func TestRefusesInvalidNames(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	for _, name := range []string{"../etc", "Core", strings.Repeat("a", 27)} {
		_, err := f.applier.Apply(context.Background(), instance(name, r1))
		var fail *apply.Failure
		if !errors.As(err, &fail) || fail.Reason != "InvalidName" {
			t.Errorf("profile %q: %v, want InvalidName", name, err)
		}
	}
	bad := r1
	bad.Label = "../x"
	if _, err := f.applier.Apply(context.Background(), instance("core", bad)); err == nil {
		t.Error("a label with .. was accepted")
	}
	if _, err := os.Stat(filepath.Join(f.host.Root, "opt/agent/gateways")); err == nil {
		entries, _ := os.ReadDir(filepath.Join(f.host.Root, "opt/agent/gateways"))
		if len(entries) != 0 {
			t.Errorf("refused applies left %d profile folders", len(entries))
		}
	}
}

// TestAutoRollbackOff: with autoRollback off a failed release stays on the host, for
// inspection, and the report says so.
func TestAutoRollbackOff(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	broken := f.publish(agentruntime.Options{Version: "2.0.0-broken", CrashAtStart: true})
	f.mustApply(instance("core", r1))
	in := instance("core", broken)
	in.KeepFailed = true
	_, err := f.applier.Apply(context.Background(), in)
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.RolledBack || !strings.Contains(fail.Message, "autoRollback is off") {
		t.Fatalf("apply: %v", err)
	}
	if got := f.current("core"); got != broken.SHA256+"-"+broken.Label {
		t.Errorf("current -> %s, want the failed release kept", got)
	}
}

// TestHealthProbeCatchesLateCrash: a release that passes its proof and dies a moment later is
// caught by the health probe and rolled back; without a probe the apply would have succeeded.
func TestHealthProbeCatchesLateCrash(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	late := f.publish(agentruntime.Options{Version: "2.0.0-late", CrashAfter: 1500 * time.Millisecond})
	f.mustApply(instance("core", r1))
	in := instance("core", late)
	in.Probe = apply.Probe{Count: 4, Period: 500 * time.Millisecond}
	_, err := f.applier.Apply(context.Background(), in)
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.Reason != "ProbeFailed" || !fail.RolledBack {
		t.Fatalf("apply of a release that dies after its start: %v", err)
	}
	f.assertServes("core", r1)
}

// TestConcurrentAppliesShareARelease: profiles applied at once that want the same release,
// not yet on the host, all get it: one stages it while the others wait, and every gateway is
// proven on it.
func TestConcurrentAppliesShareARelease(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	profiles := []string{"core", "api", "mcp"}
	for round, version := range []string{"1.0.0", "2.0.0", "3.0.0"} {
		r := f.publish(agentruntime.Options{Version: version})
		errs := make(chan error, len(profiles))
		for _, p := range profiles {
			go func() {
				_, err := f.applier.Apply(context.Background(), instance(p, r))
				errs <- err
			}()
		}
		for range profiles {
			if err := <-errs; err != nil {
				t.Fatalf("round %d (%s): %v", round+1, version, err)
			}
		}
		for _, p := range profiles {
			f.assertServes(p, r)
		}
	}
}
