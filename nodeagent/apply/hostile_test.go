package apply_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// The TestHostileGateway tests run gateways that attack the agent running them, on real
// systemd hosts, and check that each attack gains nothing.

// TestHostileGatewaySymlinkSwapGainsNoFile: while the gateway swaps a folder of its home with a
// symlink to a root-owned folder as fast as it can, the agent re-applies the profile many
// times, switching it between isolation modes so that every other apply hands the home to
// another user. The root-owned folder and its file never change hands.
func TestHostileGatewaySymlinkSwapGainsNoFile(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	canaryDir := filepath.Join(f.host.Root, "opt/canary")
	if err := os.MkdirAll(canaryDir, 0o755); err != nil {
		t.Fatal(err)
	}
	canary := filepath.Join(canaryDir, "shadow")
	if err := os.WriteFile(canary, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := f.publish(agentruntime.Options{Version: "1.0.0", Hostile: agentruntime.HostileSwap, SwapTarget: "/opt/canary"})
	in := instance("core", r)
	const applies = 12
	for i := range applies {
		in.Isolation = v1.IsolationProduction
		if i%2 == 1 {
			in.Isolation = v1.IsolationConvenience
		}
		f.mustApply(in)
		// Let the swapper run a while against the home as the apply left it.
		time.Sleep(50 * time.Millisecond)
		for _, p := range []string{canaryDir, canary} {
			fi, err := os.Lstat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 {
				t.Fatalf("apply %d: %s was taken over by uid %d gid %d", i+1, p, st.Uid, st.Gid)
			}
		}
	}
	// The swapper really ran: the symlink it plants exists in the home.
	if _, err := os.Lstat(filepath.Join(f.host.Root, "opt/agent/gateways/core/home/swap")); err != nil {
		if _, err2 := os.Lstat(filepath.Join(f.host.Root, "opt/agent/gateways/core/home/sub")); err2 != nil {
			t.Fatalf("the hostile runtime never set up its swap: %v / %v", err, err2)
		}
	}
}

// TestHostileGatewayMuteSocketDoesNotStallSiblings: a gateway that accepts on its status socket
// and never answers holds only its own apply (for at most the proof timeout); a sibling applied
// at the same time is changed and proven while the mute one is still waiting.
func TestHostileGatewayMuteSocketDoesNotStallSiblings(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	good1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	good2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	mute := f.publish(agentruntime.Options{Version: "9.0.0", Hostile: agentruntime.HostileMute})
	f.mustApply(instance("api", good1))
	f.applier.ProofTimeout = 8 * proof.StatusTimeout

	muteDone := make(chan error, 1)
	go func() {
		_, err := f.applier.Apply(context.Background(), instance("core", mute))
		muteDone <- err
	}()
	// Wait until the mute gateway is up and holding a connection of the agent.
	deadline := time.Now().Add(30 * time.Second)
	for f.mainPID("core") == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	out, err := f.applier.Apply(context.Background(), instance("api", good2))
	if err != nil {
		t.Fatalf("the sibling's apply failed while core was mute: %v", err)
	}
	select {
	case err := <-muteDone:
		t.Fatalf("the mute gateway's apply ended (%v) before the sibling's: nothing was shown", err)
	default:
	}
	if out.Current.Label != "2.0.0" || !out.Restarted {
		t.Errorf("sibling outcome %+v", out)
	}
	f.assertServes("api", good2)
	select {
	case err := <-muteDone:
		var fail *apply.Failure
		if !errors.As(err, &fail) || fail.Reason != "ProofFailed" {
			t.Fatalf("mute gateway: %v, want a ProofFailed failure", err)
		}
	case <-time.After(10 * f.applier.ProofTimeout):
		t.Fatal("the mute gateway's apply never ended")
	}
}

// TestHostileGatewayForgedProofIsNotTrusted: a gateway that, when its release changes, rewrites
// its own environment block, moves into the new release folder and reports the new sha on its
// status endpoint still gets restarted: the agent restarts after every change to what a
// gateway reads at start, and proves the new process (new PID and kernel start time).
func TestHostileGatewayForgedProofIsNotTrusted(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0", Hostile: agentruntime.HostileForge})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	first := f.mustApply(instance("core", r1))
	// Let the forgery finish before the agent decides whether to restart: by then `current`
	// points at 2.0.0 and the old process claims to be it.
	forged := false
	f.applier.BeforeStep = func(s apply.Step) {
		if s != apply.StepRestart {
			return
		}
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			if st := f.status("core"); st.PID == int(first.MainPID) && st.ReleaseSHA == r2.SHA256 {
				forged = true
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	out := f.mustApply(instance("core", r2))
	f.applier.BeforeStep = nil
	if !forged {
		t.Fatal("the hostile runtime never forged its status")
	}
	if !out.Restarted {
		t.Fatal("the agent took the forging gateway's word and did not restart it")
	}
	if out.MainPID == first.MainPID && out.Alignment.StartTime == first.Alignment.StartTime {
		t.Fatalf("the proof names the old process (pid %d, start %d)", out.MainPID, out.Alignment.StartTime)
	}
	st := f.status("core")
	if st.Version != "2.0.0" || st.PID != int(out.MainPID) {
		t.Fatalf("the gateway runs version %s as pid %d, want 2.0.0 as %d", st.Version, st.PID, out.MainPID)
	}
	if got := strings.Join(out.Alignment.SelfReported, ","); !strings.Contains(got, "environ") || !strings.Contains(got, "status") {
		t.Errorf("the proof does not say which facts are self-reported: %q", got)
	}
	if out.Alignment.ControlGroup == "" || out.Alignment.StartTime == 0 {
		t.Errorf("the proof lacks the root-controlled facts: %+v", out.Alignment)
	}
}

// TestHostileGatewayCannotReadSiblingEnv: env files are root's and 0600; a sibling's gateway,
// under its own user, is refused.
func TestHostileGatewayCannotReadSiblingEnv(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r := f.publish(agentruntime.Options{Version: "1.0.0"})
	core, api := instance("core", r), instance("api", r)
	core.Env = []v1.EnvVar{{Name: "CHANNEL_TOKEN", Value: "s3cret-core-token"}}
	f.mustApply(core)
	f.mustApply(api)
	env := filepath.Join(f.host.Root, "opt/agent/gateways/core/env")
	fi, err := os.Stat(env)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o600 || st.Uid != 0 {
		t.Fatalf("core's env file: mode %v uid %d, want 0600 root", fi.Mode(), st.Uid)
	}
	// Read it as api's user, in api's sandbox, the way api's gateway would.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := f.host.Exec(ctx, "systemd-run", "--wait", "--pipe", "--quiet", "--property=User=agent-api",
		"/usr/bin/cat", "/opt/agent/gateways/core/env")
	if err == nil || strings.Contains(string(out), "s3cret") {
		t.Fatalf("agent-api read core's env file: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Permission denied") {
		t.Errorf("reading core's env file as agent-api: %v\n%s", err, out)
	}
}

// TestHostileGatewayHomeCannotInjectCode: a profile whose env sets HOME to its own home, where
// its gateway planted a usercustomize module, still imports only from its release and the
// interpreter's library: the module never runs, and the import path the proof read says so.
func TestHostileGatewayHomeCannotInjectCode(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	in := instance("core", r1)
	in.Env = []v1.EnvVar{{Name: "HOME", Value: "/opt/agent/gateways/core/home"}}
	f.mustApply(in)
	// What a compromised gateway would write into its home for its next start.
	home := filepath.Join(f.host.Root, "opt/agent/gateways/core/home")
	marker := "/opt/agent/gateways/core/home/injected"
	py, err := exec.Command("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").Output()
	if err != nil {
		t.Fatal(err)
	}
	site := filepath.Join(home, ".local/lib/python"+strings.TrimSpace(string(py))+"/site-packages")
	if err := os.MkdirAll(site, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(site, "usercustomize.py"), []byte("open('"+marker+"', 'w').write('ran')\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	u := f.status("core").UID
	for _, p := range []string{filepath.Join(home, ".local"), filepath.Join(home, ".local/lib"), filepath.Dir(site), site, filepath.Join(site, "usercustomize.py")} {
		if err := os.Lchown(p, u, u); err != nil {
			t.Fatal(err)
		}
	}
	in.Release = r2
	out := f.mustApply(in)
	if _, err := os.Stat(filepath.Join(f.host.Root, marker)); err == nil {
		t.Fatal("the gateway imported usercustomize from its home")
	}
	for _, e := range out.Alignment.SysPath {
		if strings.HasPrefix(e, "/opt/agent/gateways/core/home") {
			t.Errorf("the gateway's import path holds its home: %q", out.Alignment.SysPath)
		}
	}
	if len(out.Alignment.SysPath) == 0 {
		t.Error("the proof holds no import path")
	}
}

// TestIsolatedRestsOnHostEvidence: Isolated is set from evidence the agent gathers on the host,
// not from the configuration: with two Production profiles every check holds; a drop-in someone
// adds by hand that turns ProtectSystem off makes the next apply report Isolated false, naming
// ProtectSystem, although the agent's own drop-in never changed.
func TestIsolatedRestsOnHostEvidence(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r := f.publish(agentruntime.Options{Version: "1.0.0"})
	f.mustApply(instance("api", r))
	out := f.mustApply(instance("core", r))
	if !out.Isolated || out.IsolationReason != "Verified" || len(out.Isolation.Checks) < 10 {
		t.Fatalf("two Production profiles: isolated %v (%s), %d checks: %s", out.Isolated, out.IsolationReason, len(out.Isolation.Checks), out.Isolation.Message)
	}
	for _, c := range out.Isolation.Checks {
		if !c.Passed {
			t.Errorf("check %s failed: %s", c.Name, c.Message)
		}
	}
	override := filepath.Join(f.host.Root, "etc/systemd/system/agent-gateway@core.service.d/zz-override.conf")
	if err := os.WriteFile(override, []byte("[Service]\nProtectSystem=no\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if outp, err := f.host.Systemctl(ctx, "daemon-reload"); err != nil {
		t.Fatalf("daemon-reload: %v\n%s", err, outp)
	}
	if outp, err := f.host.Systemctl(ctx, "restart", "agent-gateway@core.service"); err != nil {
		t.Fatalf("restart: %v\n%s", err, outp)
	}
	out = f.mustApply(instance("core", r))
	if out.Isolated || out.IsolationReason != "ProtectSystem" {
		t.Fatalf("with ProtectSystem=no added by hand: isolated %v, reason %q: %s", out.Isolated, out.IsolationReason, out.Isolation.Message)
	}
	if !strings.Contains(out.Isolation.Message, "ProtectSystem") {
		t.Errorf("the message does not name the failed check: %s", out.Isolation.Message)
	}
}

// loopFilesystem makes an ext4 filesystem of size MiB in a file, with reservePercent of its
// blocks for root only, mounts it and returns the mount point; it is unmounted when the test
// ends (after anything registered later, such as a host booted on it).
func loopFilesystem(t *testing.T, sizeMiB, reservePercent int) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, int64(sizeMiB)<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", strconv.Itoa(reservePercent), img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	mnt, err := os.MkdirTemp("", "gwfs")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		_ = os.Remove(mnt)
		t.Fatalf("mount: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
		_ = os.Remove(mnt)
	})
	return mnt
}

// TestHostileGatewayFillingItsHomeCannotStopAFix: a gateway fills the filesystem its home
// shares with the releases, as far as it can. It runs as an unprivileged user, so the blocks
// ext4 keeps for root stay free, and the agent still stages and applies the next release. The
// agent reports the reserve (StagingSpace) and, on a filesystem without one, why staging fails.
func TestHostileGatewayFillingItsHomeCannotStopAFix(t *testing.T) {
	mnt := loopFilesystem(t, 96, 20)
	f := newFixture(t, systemdhost.Options{Dir: mnt})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	f.mustApply(instance("core", r1))
	space, err := f.applier.StagingSpace()
	if err != nil || !space.Shared || !space.OK(apply.DefaultMinStagingReserve>>4) {
		t.Fatalf("staging space %+v, %v: want a shared filesystem with a root reserve", space, err)
	}

	// What a hostile gateway can do: write as its own user until the filesystem refuses.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, _ := f.host.Exec(ctx, "setpriv", "--reuid=agent-core", "--regid=agent-core", "--clear-groups", "--",
		"dd", "if=/dev/zero", "of=/opt/agent/gateways/core/home/fill", "bs=1M")
	if !strings.Contains(string(out), "No space left on device") {
		t.Fatalf("the gateway's user did not fill the filesystem:\n%s", out)
	}
	space, err = f.applier.StagingSpace()
	if err != nil || space.Available > 1<<20 || space.Reserved < 8<<20 {
		t.Fatalf("after the fill: %+v, %v", space, err)
	}
	t.Logf("after the fill: %s", space)

	got := f.mustApply(instance("core", r2))
	if got.Current.Label != "2.0.0" {
		t.Fatalf("outcome %+v", got)
	}
	f.assertServes("core", r2)
}

// TestStagingWithoutRootReserveSaysWhy: on a filesystem that keeps nothing for root, a full home
// makes staging fail; the failure is retried and says what to change.
func TestStagingWithoutRootReserveSaysWhy(t *testing.T) {
	mnt := loopFilesystem(t, 64, 0)
	f := newFixture(t, systemdhost.Options{Dir: mnt})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	f.mustApply(instance("core", r1))
	if space, err := f.applier.StagingSpace(); err != nil || space.OK(apply.DefaultMinStagingReserve) {
		t.Fatalf("staging space %+v, %v: want a shared filesystem without a reserve", space, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Nothing is kept for root here, so filling the filesystem to the last block is the same
	// whoever does it; the fill runs as root to leave no partial block behind.
	for _, bs := range []string{"1M", "4k"} {
		_, _ = f.host.Exec(ctx, "dd", "if=/dev/zero", "of=/opt/agent/gateways/core/home/fill-"+bs, "bs="+bs)
	}
	_, err := f.applier.Apply(context.Background(), instance("core", r2))
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.Reason != "NoSpace" || !fail.Retry || !strings.Contains(fail.Message, "tune2fs") {
		t.Fatalf("apply on a full filesystem without reserve: %v", err)
	}
	f.assertServes("core", r1)
}
