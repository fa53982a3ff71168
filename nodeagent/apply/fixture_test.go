package apply_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/repo"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// launchBin is the launch binary, built once for the package.
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

// fixture is one real systemd host, an applier for it, and releases served over HTTP.
type fixture struct {
	t       testing.TB
	host    *systemdhost.Host
	applier *apply.Applier
	server  *agentruntime.Server
}

func newFixture(t testing.TB, opts systemdhost.Options) *fixture {
	h := systemdhost.Start(t, opts)
	f := &fixture{t: t, host: h, server: agentruntime.Serve(t)}
	f.applier = f.newApplier()
	return f
}

func (f *fixture) newApplier() *apply.Applier {
	return &apply.Applier{
		Host:         layout.Host{Root: f.host.Root},
		Systemd:      f.host.Dial(f.t),
		Releases:     &release.Store{Dir: filepath.Join(f.host.Root, "opt/agent/releases")},
		ProcRoot:     fmt.Sprintf("/proc/%d/root/proc", f.host.PID),
		Launcher:     launchBin,
		ProofTimeout: 20 * time.Second,
		Log:          testr.NewWithInterface(f.t, testr.Options{Verbosity: 1}),
	}
}

// publish builds a release and serves it.
func (f *fixture) publish(o agentruntime.Options) release.Artifact {
	tb := agentruntime.MustBuild(f.t, o)
	url := f.server.Add(tb.Label+".tar.gz", tb.Data)
	return release.Artifact{URL: url, SHA256: tb.SHA256, Label: tb.Label}
}

func instance(profile string, r release.Artifact) apply.Instance {
	return apply.Instance{Profile: profile, Release: r, Mode: v1.EntrypointCLI, Isolation: v1.IsolationProduction}
}

func (f *fixture) mustApply(in apply.Instance) *apply.Outcome {
	f.t.Helper()
	out, err := f.applier.Apply(context.Background(), in)
	if err != nil {
		f.t.Fatalf("apply %s on %s: %v\n%s", in.Profile, in.Release.Label, err, f.host.Journal(layout.Unit(in.Profile)))
	}
	return out
}

// status asks a profile's gateway for its status endpoint.
func (f *fixture) status(profile string) *agentruntime.Status {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := agentruntime.GetStatus(ctx, filepath.Join(f.host.Root, "opt/agent/gateways", profile, "home/run/status.sock"))
	if err != nil {
		f.t.Fatalf("status of %s: %v", profile, err)
	}
	return st
}

func (f *fixture) mainPID(profile string) uint32 {
	f.t.Helper()
	pid, err := f.applier.Systemd.MainPID(context.Background(), layout.Unit(profile))
	if err != nil {
		f.t.Fatal(err)
	}
	return pid
}

// current returns the release folder a profile's `current` link points at.
func (f *fixture) current(profile string) string {
	f.t.Helper()
	t, err := os.Readlink(filepath.Join(f.host.Root, "opt/agent/gateways", profile, "current"))
	if err != nil {
		f.t.Fatal(err)
	}
	return filepath.Base(t)
}

// assertServes checks that a profile's gateway answers from the given release.
func (f *fixture) assertServes(profile string, r release.Artifact) {
	f.t.Helper()
	st := f.status(profile)
	if st.ReleaseSHA != r.SHA256 || st.Version != r.Label || !strings.HasSuffix(st.ReleaseRoot, r.SHA256+"-"+r.Label) {
		f.t.Errorf("%s serves %s (%s from %s), want %s", profile, st.Version, st.ReleaseSHA, st.ReleaseRoot, r.Label)
	}
	if got := f.current(profile); got != r.SHA256+"-"+r.Label {
		f.t.Errorf("%s/current -> %s, want %s-%s", profile, got, r.SHA256, r.Label)
	}
}
