// Package e2e runs the whole system: the real API server, the manager binary, and two node agent
// binaries on two real systemd hosts, driven with the real kubectl.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/stack"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func TestMain(m *testing.M) { os.Exit(systemdhost.RunWithLeakCheck(m)) }

// dropDir is a folder for a test's release tarballs inside the agents' release drop folder
// (the default --release-file-root), the only place file:// release URLs may point into.
func dropDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp(agentruntime.SampleDir, "e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

func up(t *testing.T, hosts ...string) *stack.Stack {
	t.Helper()
	return upWith(t, stack.Options{Hosts: hosts})
}

// upWith starts a stack with o; Dir, BinDir and Progress are filled in.
func upWith(t *testing.T, o stack.Options) *stack.Stack {
	t.Helper()
	hosts := o.Hosts
	if os.Geteuid() != 0 {
		t.Fatal("the end-to-end tests boot systemd hosts and need root")
	}
	bin := t.TempDir()
	if err := stack.Build(bin); err != nil {
		t.Fatal(err)
	}
	o.Dir, o.BinDir, o.Progress = t.TempDir(), bin, func(m string) { t.Log(m) }
	s, err := stack.Up(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, name := range append([]string{"manager"}, prefixed("agent-", hosts)...) {
				t.Logf("--- %s log (tail):\n%s", name, tail(s.Log(name), 40))
			}
		}
		if err := s.Down(); err != nil {
			t.Errorf("stack down: %v", err)
		}
	})
	return s
}

func prefixed(p string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = p + n
	}
	return out
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func eventually(t *testing.T, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	poll.Until(t, what, timeout, cond)
}

func kubectl(t *testing.T, s *stack.Stack, args ...string) string {
	t.Helper()
	out, err := s.Kubectl(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// mainPIDs reads, from each host's systemd, the main PID of a profile's unit.
func mainPIDs(t *testing.T, s *stack.Stack, profile string) map[string]uint32 {
	t.Helper()
	pids := map[string]uint32{}
	for name, h := range s.Hosts {
		sd := h.Dial(t)
		pid, err := sd.MainPID(context.Background(), "agent-gateway@"+profile+".service")
		if err != nil {
			t.Fatal(err)
		}
		pids[name] = pid
	}
	return pids
}

func profileAligned(s *stack.Stack, name, label string, hosts int32) func() (bool, string) {
	return func() (bool, string) {
		var p v1.GatewayProfile
		if err := s.CP.Client.Get(context.Background(), client.ObjectKey{Name: name}, &p); err != nil {
			return false, err.Error()
		}
		ok := p.Status.Desired == hosts && p.Status.Aligned == hosts && p.Status.TargetRelease != nil &&
			p.Status.TargetRelease.Label == label && meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReady)
		return ok, fmt.Sprintf("%+v", p.Status)
	}
}

// TestSamplesReachTwoHosts: kubectl apply -f config/samples/ makes both hosts run core and
// api, aligned; a release change of core restarts only core, on both hosts; deleting api
// removes its units from both hosts and leaves core alone.
func TestSamplesReachTwoHosts(t *testing.T) {
	s := up(t, "node-a", "node-b")
	ctx := context.Background()

	for name := range s.Hosts {
		eventually(t, name+" registered, Ready and Reachable", time.Minute, func() (bool, string) {
			var h v1.GatewayHost
			if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
				return false, err.Error()
			}
			return meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReady) &&
				meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReachable), fmt.Sprintf("%+v", h.Status)
		})
	}
	kubectl(t, s, "apply", "-f", "config/samples/")
	for _, p := range []string{"core", "api"} {
		eventually(t, p+" aligned on both hosts", 3*time.Minute, profileAligned(s, p, "1.0.0", 2))
	}
	out := kubectl(t, s, "get", "gwp")
	header := strings.Fields(strings.SplitN(out, "\n", 2)[0])
	if strings.Join(header, " ") != "NAME RELEASE HOSTS UPDATED ALIGNED DEGRADED READY AGE" {
		t.Errorf("kubectl get gwp columns: %v\n%s", header, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) != 8 || f[1] != "agent-runtime-1.0.0" || strings.Join(f[2:7], " ") != "2 2 2 0 True" {
			t.Errorf("kubectl get gwp row %q, want RELEASE agent-runtime-1.0.0 and 2 2 2 0 True", line)
		}
	}
	t.Logf("kubectl get gwh,grel,gwp,gwi:\n%s", kubectl(t, s, "get", "gwh,grel,gwp,gwi"))

	var gi v1.GatewayInstance
	if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "core.node-a"}, &gi); err != nil {
		t.Fatal(err)
	}
	if !meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionIsolated) || gi.Status.Isolation == nil || gi.Status.Isolation.ExposureScore == "" {
		t.Errorf("core.node-a isolation: %+v", gi.Status.Isolation)
	}
	if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "api.node-b"}, &gi); err != nil {
		t.Fatal(err)
	}
	if iso := meta.FindStatusCondition(gi.Status.Conditions, v1.ConditionIsolated); iso == nil || iso.Status != "False" {
		t.Errorf("api.node-b (Convenience) Isolated: %+v", iso)
	}

	// A second release, for core only.
	tb := agentruntime.MustBuild(t, agentruntime.Options{Version: "2.0.0"})
	tarball := filepath.Join(dropDir(t), "agent-runtime-2.0.0.tar.gz")
	if err := os.WriteFile(tarball, tb.Data, 0o644); err != nil {
		t.Fatal(err)
	}
	manifest := filepath.Join(t.TempDir(), "release-2.yaml")
	if err := os.WriteFile(manifest, []byte(fmt.Sprintf(`apiVersion: gateway.agent.dev/v1alpha1
kind: Release
metadata:
  name: agent-runtime-2.0.0
spec:
  source:
    url: file://%s
  sha256: %s
  label: 2.0.0
`, tarball, tb.SHA256)), 0o644); err != nil {
		t.Fatal(err)
	}
	kubectl(t, s, "apply", "-f", manifest)
	coreBefore, apiBefore := mainPIDs(t, s, "core"), mainPIDs(t, s, "api")
	kubectl(t, s, "patch", "gwp", "core", "--type=merge", "-p", `{"spec":{"release":"agent-runtime-2.0.0"}}`)
	eventually(t, "core on 2.0.0 on both hosts", 3*time.Minute, profileAligned(s, "core", "2.0.0", 2))
	coreAfter, apiAfter := mainPIDs(t, s, "core"), mainPIDs(t, s, "api")
	for host := range s.Hosts {
		if coreAfter[host] == coreBefore[host] || coreAfter[host] == 0 {
			t.Errorf("core on %s was not restarted (pid %d -> %d)", host, coreBefore[host], coreAfter[host])
		}
		if apiAfter[host] != apiBefore[host] {
			t.Errorf("changing core's release restarted api on %s (pid %d -> %d)", host, apiBefore[host], apiAfter[host])
		}
	}

	kubectl(t, s, "delete", "gwp", "api", "--wait=true", "--timeout=120s")
	for name, h := range s.Hosts {
		for _, gone := range []string{"opt/agent/gateways/api/env", "opt/agent/gateways/api/current",
			"etc/systemd/system/agent-gateway@api.service.d"} {
			if _, err := os.Lstat(filepath.Join(h.Root, gone)); err == nil {
				t.Errorf("%s: %s survived the deletion of api", name, gone)
			}
		}
	}
	for host, pid := range mainPIDs(t, s, "api") {
		if pid != 0 {
			t.Errorf("api still runs on %s as %d", host, pid)
		}
	}
	for host, pid := range mainPIDs(t, s, "core") {
		if pid != coreAfter[host] {
			t.Errorf("deleting api restarted core on %s (%d -> %d)", host, coreAfter[host], pid)
		}
	}
	if out, err := s.Kubectl("get", "gwi", "-l", "gateway.agent.dev/profile=api", "--no-headers"); err != nil || strings.TrimSpace(out) != "No resources found" && strings.TrimSpace(out) != "" {
		t.Errorf("api instances left: %q %v", out, err)
	}
}

// TestCanaryCatchesBrokenRelease rolls releases over three real hosts with a one-host canary:
// the first release goes everywhere at once (no host serves anything yet, so moving them costs
// no availability); the next good release goes canary, pause, promote, everywhere; a broken one
// (the runtime exits at start) fails on the canary host, whose agent returns it to the good
// release, and the other two hosts are never touched.
func TestCanaryCatchesBrokenRelease(t *testing.T) {
	s := up(t, "edge-a", "edge-b", "edge-c")
	ctx := context.Background()
	dir := dropDir(t)
	publish := func(o agentruntime.Options) string {
		tb := agentruntime.MustBuild(t, o)
		name := "rt-" + strings.ReplaceAll(tb.Label, ".", "-")
		if err := s.Publish(dir, name, tb); err != nil {
			t.Fatal(err)
		}
		return name
	}
	good1 := publish(agentruntime.Options{Version: "1.0.0"})
	good2 := publish(agentruntime.Options{Version: "2.0.0"})
	broken := publish(agentruntime.Options{Version: "3.0.0-broken", CrashAtStart: true})

	profile := filepath.Join(dir, "edge.yaml")
	write := func(release string) {
		if err := os.WriteFile(profile, []byte(fmt.Sprintf(`apiVersion: gateway.agent.dev/v1alpha1
kind: GatewayProfile
metadata:
  name: edge
spec:
  release: %s
  nodeSelector: {}
  rollout:
    maxUnavailable: 1
    progressDeadlineSeconds: 60
    canary:
      hosts: 1
`, release)), 0o644); err != nil {
			t.Fatal(err)
		}
		kubectl(t, s, "apply", "-f", profile)
	}
	phase := func(want v1.RolloutPhase) func() (bool, string) {
		return func() (bool, string) {
			var p v1.GatewayProfile
			if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "edge"}, &p); err != nil || p.Status.Rollout == nil {
				return false, fmt.Sprint(err)
			}
			return p.Status.Rollout.Phase == want, string(p.Status.Rollout.Phase) + ": " + p.Status.Rollout.Step
		}
	}
	write(good1)
	// The first rollout: nothing serves yet, so every host moves at once, without a pause.
	eventually(t, "1.0.0 everywhere", 2*time.Minute, profileAligned(s, "edge", "1.0.0", 3))
	eventually(t, "the first rollout complete", 2*time.Minute, phase(v1.RolloutComplete))

	write(good2)
	eventually(t, "the canary pause on 2.0.0", 2*time.Minute, phase(v1.RolloutPaused))
	kubectl(t, s, "annotate", "gwp", "edge", "gateway.agent.dev/promote=now")
	eventually(t, "2.0.0 everywhere", 2*time.Minute, profileAligned(s, "edge", "2.0.0", 3))
	before := mainPIDs(t, s, "edge")

	write(broken)
	eventually(t, "the halt", 2*time.Minute, phase(v1.RolloutHalted))
	var p v1.GatewayProfile
	if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "edge"}, &p); err != nil {
		t.Fatal(err)
	}
	if len(p.Status.Rollout.Failed) != 1 {
		t.Fatalf("failed hosts: %v", p.Status.Rollout.Failed)
	}
	canary := strings.SplitN(p.Status.Rollout.Failed[0], ":", 2)[0]
	d := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionDegraded)
	if d == nil || !strings.Contains(d.Message, canary) {
		t.Errorf("Degraded condition does not name %s: %+v", canary, d)
	}
	time.Sleep(3 * time.Second) // a halted rollout stays halted
	after := mainPIDs(t, s, "edge")
	for name, h := range s.Hosts {
		var gi v1.GatewayInstance
		if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "edge." + name}, &gi); err != nil {
			t.Fatal(err)
		}
		st, err := agentruntime.GetStatus(ctx, filepath.Join(h.Root, "opt/agent/gateways/edge/home/run/status.sock"))
		if err != nil || st.Version != "2.0.0" {
			t.Errorf("%s does not serve 2.0.0 after the broken rollout: %+v %v", name, st, err)
		}
		if name == canary {
			if gi.Spec.Release.Label != "3.0.0-broken" {
				t.Errorf("the canary %s was not the one moved", name)
			}
			continue
		}
		if gi.Spec.Release.Label != "2.0.0" || after[name] != before[name] {
			t.Errorf("%s was touched: asks for %s, pid %d -> %d", name, gi.Spec.Release.Label, before[name], after[name])
		}
	}
}

// TestRollbackAfterAFailedRelease is what a new user does with `make demo`: the samples on one
// host; api pointed at a release that fails on the host (its archive climbs out of the release
// folder); the agent keeps the host on the good release, the rollout halts, the profile is
// Degraded. Rolling back the documented way, spec.release back to the good release, converges:
// the rollout Complete, the profile Ready and no longer Degraded, the host proven on the good
// release, core never touched.
func TestRollbackAfterAFailedRelease(t *testing.T) {
	s := up(t, "demo")
	ctx := context.Background()
	kubectl(t, s, "apply", "-f", "config/samples/")
	for _, p := range []string{"core", "api"} {
		eventually(t, p+" aligned", 3*time.Minute, profileAligned(s, p, "1.0.0", 1))
	}
	core := mainPIDs(t, s, "core")

	tb := agentruntime.MustBuild(t, agentruntime.Options{Version: "2.0.0-unsafe", UnsafeEntry: true})
	if err := s.Publish(dropDir(t), "agent-runtime-unsafe", tb); err != nil {
		t.Fatal(err)
	}
	api := func() v1.GatewayProfile {
		var p v1.GatewayProfile
		if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "api"}, &p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kubectl(t, s, "patch", "gwp", "api", "--type=merge", "-p", `{"spec":{"release":"agent-runtime-unsafe"}}`)
	eventually(t, "api halted and Degraded", 2*time.Minute, func() (bool, string) {
		p := api()
		ok := p.Status.Rollout != nil && p.Status.Rollout.Phase == v1.RolloutHalted &&
			meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionDegraded)
		return ok, fmt.Sprintf("%+v", p.Status)
	})
	t.Logf("halted: %s", meta.FindStatusCondition(api().Status.Conditions, v1.ConditionDegraded).Message)
	h := s.Hosts["demo"]
	socket := filepath.Join(h.Root, "opt/agent/gateways/api/home/run/status.sock")
	if st, err := agentruntime.GetStatus(ctx, socket); err != nil || st.Version != "1.0.0" {
		t.Errorf("after the failed release the host does not serve api 1.0.0: %+v %v", st, err)
	}
	if _, err := os.Lstat(filepath.Join(h.Root, "opt/agent/releases/escaped")); err == nil {
		t.Error("the unsafe archive wrote outside its release folder")
	}

	kubectl(t, s, "patch", "gwp", "api", "--type=merge", "-p", `{"spec":{"release":"agent-runtime-1.0.0"}}`)
	eventually(t, "the rollback complete, api Ready and not Degraded", 2*time.Minute, func() (bool, string) {
		p := api()
		ok := p.Status.Rollout != nil && p.Status.Rollout.Phase == v1.RolloutComplete &&
			p.Status.Rollout.To != nil && p.Status.Rollout.To.Label == "1.0.0" && p.Status.Updated == 1 && p.Status.Aligned == 1 &&
			meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReady) &&
			meta.IsStatusConditionFalse(p.Status.Conditions, v1.ConditionDegraded)
		return ok, fmt.Sprintf("%+v", p.Status)
	})
	var gi v1.GatewayInstance
	if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "api.demo"}, &gi); err != nil {
		t.Fatal(err)
	}
	if gi.Spec.Release.Label != "1.0.0" || gi.Status.CurrentRelease == nil || gi.Status.CurrentRelease.Label != "1.0.0" ||
		!meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned) || gi.Status.Alignment == nil {
		t.Errorf("api.demo is not proven on 1.0.0: spec %s, status %+v", gi.Spec.Release.Label, gi.Status)
	}
	if st, err := agentruntime.GetStatus(ctx, socket); err != nil || st.Version != "1.0.0" || int64(st.PID) != gi.Status.MainPID {
		t.Errorf("api after the rollback: %+v %v (instance says main PID %d)", st, err, gi.Status.MainPID)
	}
	if now := mainPIDs(t, s, "core"); now["demo"] != core["demo"] {
		t.Errorf("core was restarted: %d -> %d", core["demo"], now["demo"])
	}
	t.Logf("kubectl get gwp,gwi:\n%s", kubectl(t, s, "get", "gwp,gwi"))
}

// TestBareMetalHostJoins: a host that joins as docs/install.md says (a bootstrap token issued for
// it, `gateway-nodeagent bootstrap`, a real signer, the manager's approver) runs under its own
// agent identity and applies the samples.
func TestBareMetalHostJoins(t *testing.T) {
	s := upWith(t, stack.Options{Hosts: []string{"metal-1"}, Bootstrap: true})
	ctx := context.Background()
	var csrs certificatesv1.CertificateSigningRequestList
	if err := s.CP.Client.List(ctx, &csrs); err != nil {
		t.Fatal(err)
	}
	joined := false
	for _, c := range csrs.Items {
		if strings.HasPrefix(c.Spec.Username, "system:bootstrap:") && strings.HasPrefix(c.Name, "gateway-agent-metal-1-") &&
			len(c.Status.Conditions) > 0 && c.Status.Conditions[0].Type == certificatesv1.CertificateApproved && len(c.Status.Certificate) > 0 {
			joined = true
		}
	}
	if !joined {
		t.Fatalf("no approved and signed request from a bootstrap token for metal-1: %+v", csrs.Items)
	}
	kubectl(t, s, "apply", "-f", "config/samples/")
	for _, p := range []string{"core", "api"} {
		eventually(t, p+" aligned on metal-1", 3*time.Minute, profileAligned(s, p, "1.0.0", 1))
	}
	var h v1.GatewayHost
	if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "metal-1"}, &h); err != nil {
		t.Fatal(err)
	}
	if h.Status.LastHeartbeatTime == nil || !meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReachable) {
		t.Fatalf("metal-1 status: %+v", h.Status)
	}
}
