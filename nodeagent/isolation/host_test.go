package isolation_test

import (
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/isolation"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/repo"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// launchBin is the launch binary (gateway launcher and probe), built once for the package.
var launchBin string

func TestMain(m *testing.M) {
	bins, cleanup, err := repo.BuildTemp("gateway-launch")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	launchBin = bins[0]
	code := systemdhost.RunWithLeakCheck(m)
	cleanup()
	os.Exit(code)
}

// egress is core's allowlist: addresses that exist nowhere on the test host.
var egress = []string{"10.0.0.0/8", "192.0.2.7"}

// twoProfiles is a real systemd host running the Production profiles core and api, brought up
// by the agent's own apply, and a verifier for it.
type twoProfiles struct {
	t        testing.TB
	host     *systemdhost.Host
	verifier *isolation.Verifier
	core     layout.Profile
	api      layout.Profile
}

func startTwoProfiles(t testing.TB) *twoProfiles {
	h := systemdhost.Start(t, systemdhost.Options{})
	conn := h.Dial(t)
	applier := &apply.Applier{
		Host:         layout.Host{Root: h.Root},
		Systemd:      conn,
		Releases:     &release.Store{Dir: filepath.Join(h.Root, "opt/agent/releases")},
		ProcRoot:     fmt.Sprintf("/proc/%d/root/proc", h.PID),
		Launcher:     launchBin,
		ProofTimeout: 20 * time.Second,
		Log:          testr.NewWithInterface(t, testr.Options{}),
	}
	server := agentruntime.Serve(t)
	tb := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	r := release.Artifact{URL: server.Add("1.0.0.tar.gz", tb.Data), SHA256: tb.SHA256, Label: tb.Label}
	f := &twoProfiles{t: t, host: h, verifier: &isolation.Verifier{Systemd: conn, Host: layout.Host{Root: h.Root}}}
	for _, name := range []string{"core", "api"} {
		in := apply.Instance{Profile: name, Release: r, Mode: v1.EntrypointCLI, Isolation: v1.IsolationProduction}
		if name == "core" {
			in.Egress = egress
		}
		if _, err := applier.Apply(context.Background(), in); err != nil {
			t.Fatalf("apply %s: %v\n%s", name, err, h.Journal(layout.Unit(name)))
		}
		p, err := layout.ForProfile(name)
		if err != nil {
			t.Fatal(err)
		}
		// Env files are root's alone (systemd reads them before dropping privileges); make them
		// so here whatever mode the apply under test writes them with.
		f.chmod(p.Env, 0o600)
		if name == "core" {
			f.core = p
		} else {
			f.api = p
		}
	}
	return f
}

func (f *twoProfiles) settings(p layout.Profile) unit.Settings {
	s := unit.Settings{Profile: p, Isolation: v1.IsolationProduction}
	if p.Name == "core" {
		s.Egress = egress
	}
	return s
}

// verify gathers the evidence for one profile, its sibling being the other.
func (f *twoProfiles) verify(p layout.Profile) isolation.Evidence {
	f.t.Helper()
	sibling := f.api
	if p.Name == "api" {
		sibling = f.core
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	ev, err := f.verifier.Verify(ctx, p, f.settings(p), []layout.Profile{sibling})
	if err != nil {
		f.t.Fatalf("verify %s: %v\n%s", p.Name, err, f.host.Journal(layout.ProbeUnit(p.Name)))
	}
	f.t.Logf("verify %s took %s: %s", p.Name, time.Since(start).Round(time.Millisecond), ev.Message())
	return ev
}

func (f *twoProfiles) chmod(inside string, mode os.FileMode) {
	f.t.Helper()
	if err := os.Chmod(f.host.Root+inside, mode); err != nil {
		f.t.Fatal(err)
	}
}

// override adds a hand-written drop-in to a unit, as an administrator would, and reloads.
func (f *twoProfiles) override(unitName, text string) {
	f.t.Helper()
	dir := filepath.Join(f.host.Root, layout.UnitDir, unitName+".d")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "zz-override.conf"), []byte("[Service]\n"+text+"\n"), 0o644); err != nil {
		f.t.Fatal(err)
	}
	f.reload()
}

func (f *twoProfiles) removeOverride(unitName string) {
	f.t.Helper()
	if err := os.Remove(filepath.Join(f.host.Root, path.Join(layout.UnitDir, unitName+".d", "zz-override.conf"))); err != nil {
		f.t.Fatal(err)
	}
	f.reload()
}

func (f *twoProfiles) reload() {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := f.verifier.Systemd.Reload(ctx); err != nil {
		f.t.Fatal(err)
	}
}

// assertFailed checks that the evidence is not Isolated and that the named check failed.
func assertFailed(t *testing.T, ev isolation.Evidence, name string) {
	t.Helper()
	if ev.Isolated {
		t.Errorf("Isolated with %s broken:\n%s", name, dump(ev))
	}
	if c, ok := ev.Check(name); !ok || c.Passed {
		t.Errorf("check %s did not fail:\n%s", name, dump(ev))
	}
}

func assertPassed(t *testing.T, ev isolation.Evidence, name string) {
	t.Helper()
	if c, ok := ev.Check(name); !ok || !c.Passed {
		t.Errorf("check %s failed:\n%s", name, dump(ev))
	}
}

func dump(ev isolation.Evidence) string {
	s := ""
	for _, c := range ev.Checks {
		verdict := "ok  "
		if !c.Passed {
			verdict = "FAIL"
		}
		s += fmt.Sprintf("  %s %s: %s\n", verdict, c.Name, c.Message)
	}
	return s
}
