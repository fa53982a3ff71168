package agent_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// driftHost is a real systemd host whose agent runs core, api and web (spec.drift Heal; api and
// web on one release) and rep (Report, on core's release), with the backstop an hour away:
// whatever the test sees comes from the watches.
type driftHost struct {
	t    *testing.T
	h    *systemdhost.Host
	sd   *systemd.Conn
	name string
}

func startDriftHost(t *testing.T, name string) *driftHost {
	ctx := context.Background()
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	r2 := agentruntime.MustBuild(t, agentruntime.Options{Version: "2.0.0"})
	u1, u2 := srv.Add("r1.tar.gz", r1.Data), srv.Add("r2.tar.gz", r2.Data)
	h := startAgent(t, name, func(o *agent.Options) { o.ReproveInterval = time.Hour })
	d := &driftHost{t: t, h: h, sd: h.Dial(t), name: name}
	core, api, rep := newInstance("core", name, r1, u1), newInstance("api", name, r2, u2), newInstance("rep", name, r1, u1)
	web := newInstance("web", name, r2, u2)
	rep.Spec.Drift = v1.DriftReport
	for _, gi := range []*v1.GatewayInstance{core, api, rep, web} {
		if err := cp.Client.Create(ctx, gi); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { release(t, gi) })
	}
	for _, p := range []string{"core", "api", "rep", "web"} {
		d.waitCondition(p, "aligned", func(gi *v1.GatewayInstance) bool {
			a := condition(gi, v1.ConditionAligned)
			return a != nil && a.Status == metav1.ConditionTrue && gi.Status.ObservedGeneration == gi.Generation
		})
	}
	return d
}

func (d *driftHost) get(profile string) *v1.GatewayInstance {
	var gi v1.GatewayInstance
	if err := cp.Client.Get(context.Background(), client.ObjectKey{Name: v1.InstanceName(profile, d.name)}, &gi); err != nil {
		d.t.Fatal(err)
	}
	return &gi
}

func (d *driftHost) waitCondition(profile, what string, ok func(*v1.GatewayInstance) bool) *v1.GatewayInstance {
	d.t.Helper()
	var gi v1.GatewayInstance
	eventually(d.t, profile+" "+what, func() (bool, string) {
		if err := cp.Client.Get(context.Background(), client.ObjectKey{Name: v1.InstanceName(profile, d.name)}, &gi); err != nil {
			return false, err.Error()
		}
		return ok(&gi), fmt.Sprintf("mainPID %d conditions %+v", gi.Status.MainPID, gi.Status.Conditions)
	})
	return &gi
}

// drifted waits for the Drifted condition with status and reason whose message names what.
func (d *driftHost) drifted(profile string, status metav1.ConditionStatus, reason, what string) *v1.GatewayInstance {
	d.t.Helper()
	return d.waitCondition(profile, fmt.Sprintf("Drifted=%s %s naming %s", status, reason, what), func(gi *v1.GatewayInstance) bool {
		c := condition(gi, v1.ConditionDrifted)
		return c != nil && c.Status == status && c.Reason == reason && strings.Contains(c.Message, what)
	})
}

// warned waits for a Warning Drifted event on profile's instance (any instance of the host when
// profile is empty), after since, naming every one of whats.
func (d *driftHost) warned(profile string, since time.Time, whats ...string) {
	d.t.Helper()
	name := v1.InstanceName(profile, d.name)
	eventually(d.t, "a Drifted event for "+name+" naming "+strings.Join(whats, ", "), func() (bool, string) {
		var evs eventsv1.EventList
		if err := cp.Client.List(context.Background(), &evs); err != nil {
			return false, err.Error()
		}
		var notes []string
		for _, e := range evs.Items {
			if (profile != "" && e.Regarding.Name != name) || (profile == "" && !strings.HasSuffix(e.Regarding.Name, "."+d.name)) || e.Reason != "Drifted" || e.Type != "Warning" || e.EventTime.Time.Before(since.Truncate(time.Second)) {
				continue
			}
			notes = append(notes, e.Note)
			all := true
			for _, w := range whats {
				all = all && strings.Contains(e.Note, w)
			}
			if all {
				return true, ""
			}
		}
		return false, strings.Join(notes, "\n")
	})
}

// pids returns every gateway's main PID as systemd reports it.
func (d *driftHost) pids() map[string]uint32 {
	d.t.Helper()
	p, err := d.sd.RunningInstances(context.Background(), "agent-gateway@*.service")
	if err != nil {
		d.t.Fatal(err)
	}
	return p
}

// unchanged checks that the named gateways still run as the same processes.
func (d *driftHost) unchanged(before map[string]uint32, profiles ...string) {
	d.t.Helper()
	now := d.pids()
	for _, p := range profiles {
		u := "agent-gateway@" + p + ".service"
		if before[u] == 0 || now[u] != before[u] {
			d.t.Errorf("%s: main PID %d -> %d; it must not be restarted", u, before[u], now[u])
		}
	}
}

func (d *driftHost) on(p string) string { return filepath.Join(d.h.Root, p) }

func (d *driftHost) read(p string) string {
	d.t.Helper()
	b, err := os.ReadFile(d.on(p))
	if err != nil {
		d.t.Fatal(err)
	}
	return string(b)
}

func (d *driftHost) write(p, text string) {
	d.t.Helper()
	if err := os.MkdirAll(filepath.Dir(d.on(p)), 0o755); err != nil { //nolint:gosec // unit folders are world-readable
		d.t.Fatal(err)
	}
	if err := os.WriteFile(d.on(p), []byte(text), 0o644); err != nil { //nolint:gosec // a test's drop-in
		d.t.Fatal(err)
	}
}

// editRelease appends a line to a Python file of the release tree link points at, and returns
// the file and what it held.
func (d *driftHost) editRelease(link string) (string, []byte) {
	d.t.Helper()
	target, err := os.Readlink(d.on(link))
	if err != nil {
		d.t.Fatal(err)
	}
	tree := filepath.Join(filepath.Dir(d.on(link)), target)
	var file string
	_ = filepath.WalkDir(tree, func(p string, e os.DirEntry, _ error) error {
		if file == "" && e != nil && e.Type().IsRegular() && strings.HasSuffix(p, ".py") {
			file = p
		}
		return nil
	})
	if file == "" {
		d.t.Fatalf("no Python file in %s", tree)
	}
	want, err := os.ReadFile(file) //nolint:gosec // a file of the test's own host
	if err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(file, append(want, []byte("\nimport os; os.system('id')\n")...), 0o444); err != nil { //nolint:gosec // a release file
		d.t.Fatal(err)
	}
	return file, want
}

func (d *driftHost) systemctl(args ...string) {
	d.t.Helper()
	if out, err := d.h.Systemctl(context.Background(), args...); err != nil {
		d.t.Fatalf("systemctl %v: %v\n%s", args, err, out)
	}
}

const (
	coreEnv     = "opt/agent/gateways/core/env"
	coreCurrent = "opt/agent/gateways/core/current"
	coreDropIns = "etc/systemd/system/agent-gateway@core.service.d"
	template    = "etc/systemd/system/agent-gateway@.service"
)

// TestDriftIsHealed changes, one at a time, everything an instance depends on, on a real systemd
// host, and checks for each that the agent reports it (Drifted, a Warning event naming the change),
// puts back what it rendered, restarts the gateway only when the running process could see the
// change, and never restarts a sibling.
func TestDriftIsHealed(t *testing.T) {
	d := startDriftHost(t, "drift-heal")
	ctx := context.Background()

	t.Run("env file edited", func(t *testing.T) {
		d.t = t
		before, since, want := d.pids(), time.Now(), d.read(coreEnv)
		if err := os.WriteFile(d.on(coreEnv), []byte(want+"INJECTED=1\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		d.warned("core", since, "env /opt/agent/gateways/core/env: expected sha256:", "found sha256:")
		d.drifted("core", metav1.ConditionFalse, "Healed", "/opt/agent/gateways/core/env")
		if got := d.read(coreEnv); got != want {
			t.Errorf("env file not put back:\n%s", got)
		}
		// The gateway read its env file at start, before the edit: it is not restarted.
		d.unchanged(before, "core", "api", "rep")
	})

	t.Run("current flipped", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		want, err := os.Readlink(d.on(coreCurrent))
		if err != nil {
			t.Fatal(err)
		}
		other, err := os.Readlink(d.on("opt/agent/gateways/api/current"))
		if err != nil {
			t.Fatal(err)
		}
		tmp := d.on(coreCurrent + ".by-hand")
		if err := os.Symlink(other, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, d.on(coreCurrent)); err != nil {
			t.Fatal(err)
		}
		d.warned("core", since, "link /opt/agent/gateways/core/current: expected link:"+want+", found link:"+other)
		gi := d.drifted("core", metav1.ConditionFalse, "Healed", "/opt/agent/gateways/core/current")
		if got, _ := os.Readlink(d.on(coreCurrent)); got != want {
			t.Errorf("current points at %s, want %s", got, want)
		}
		// A running gateway imports through current: it is restarted and proven again.
		if now := d.pids()["agent-gateway@core.service"]; now == before["agent-gateway@core.service"] || int64(now) != gi.Status.MainPID {
			t.Errorf("core: main PID %d before, %d now, %d in status; want a new, reported one", before["agent-gateway@core.service"], now, gi.Status.MainPID)
		}
		d.unchanged(before, "api", "rep")
	})

	t.Run("file in the current release tree edited", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		file, want := d.editRelease(coreCurrent)
		inHost := strings.TrimPrefix(file, d.h.Root)
		d.warned("core", since, "release "+inHost+": expected tree sha256:")
		gi := d.drifted("core", metav1.ConditionFalse, "Healed", inHost)
		if got, err := os.ReadFile(file); err != nil || string(got) != string(want) { //nolint:gosec // as above
			t.Errorf("release file not put back (%v):\n%s", err, got)
		}
		// The gateway imports from that tree as it runs: it is restarted and proven again.
		if now := d.pids()["agent-gateway@core.service"]; now == before["agent-gateway@core.service"] || int64(now) != gi.Status.MainPID {
			t.Errorf("core: main PID %d before, %d now, %d in status; want a new, reported one", before["agent-gateway@core.service"], now, gi.Status.MainPID)
		}
		if c := condition(gi, v1.ConditionAligned); c == nil || c.Status != metav1.ConditionTrue {
			t.Errorf("core not proven aligned after the heal: %+v", c)
		}
		// api runs another release; rep runs this one but is Report: neither is restarted.
		d.unchanged(before, "api", "rep")
	})

	t.Run("file in a release tree two Heal profiles run", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		file, want := d.editRelease("opt/agent/gateways/api/current")
		inHost := strings.TrimPrefix(file, d.h.Root)
		d.warned("", since, "release "+inHost)
		// Whichever of api and web looks first stages the tree again; the other finds it put
		// back under its process. Both gateways may have imported the changed file: both restart.
		for _, p := range []string{"api", "web"} {
			gi := d.drifted(p, metav1.ConditionFalse, "Healed", inHost)
			u := "agent-gateway@" + p + ".service"
			if now := d.pids()[u]; now == before[u] || int64(now) != gi.Status.MainPID {
				t.Errorf("%s: main PID %d before, %d now, %d in status; want a new, reported one", p, before[u], now, gi.Status.MainPID)
			}
		}
		if got, err := os.ReadFile(file); err != nil || string(got) != string(want) { //nolint:gosec // a file of the test's own host
			t.Errorf("release file not put back (%v):\n%s", err, got)
		}
		d.unchanged(before, "core", "rep")
	})

	t.Run("drop-in setting PYTHONPATH", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		stray := coreDropIns + "/90-stray.conf"
		d.write(stray, "[Service]\nEnvironment=PYTHONPATH=/tmp/evil\n")
		d.warned("core", since, "dropin /"+stray+": expected nothing, found sha256:")
		d.drifted("core", metav1.ConditionFalse, "Healed", "/"+stray)
		if _, err := os.Stat(d.on(stray)); !os.IsNotExist(err) {
			t.Errorf("the stray drop-in is still read by systemd: %v", err)
		}
		if _, err := os.Stat(d.on(stray + ".drifted")); err != nil {
			t.Errorf("the stray drop-in was not kept aside for a person to look at: %v", err)
		}
		d.unchanged(before, "core", "api", "rep")
	})

	t.Run("drop-in weakening the sandbox, loaded", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		weak := coreDropIns + "/10-weaker.conf"
		d.write(weak, "[Service]\nProtectSystem=no\nIPAddressDeny=\n")
		d.systemctl("daemon-reload")
		d.warned("core", since, "/"+weak)
		gi := d.drifted("core", metav1.ConditionFalse, "Healed", "/"+weak)
		if iso := condition(gi, v1.ConditionIsolated); iso == nil || iso.Status != metav1.ConditionTrue {
			t.Errorf("after healing, Isolated is %+v", iso)
		}
		us, err := d.sd.UnitState(ctx, "agent-gateway@core.service")
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range us.DropInPaths {
			if strings.Contains(f, "10-weaker") {
				t.Errorf("systemd still has the weakening drop-in loaded: %v", us.DropInPaths)
			}
		}
		// The running process was started under the full sandbox, before the drop-in.
		d.unchanged(before, "core", "api", "rep")
	})

	t.Run("template edited", func(t *testing.T) {
		d.t = t
		before, since, want := d.pids(), time.Now(), d.read(template)
		d.write(template, want+"\n[Service]\nProtectSystem=no\n")
		// The template is every profile's: whichever Heal profile looks first puts it back, and
		// the others then find nothing to report.
		d.warned("", since, "unit /etc/systemd/system/agent-gateway@.service: expected sha256:")
		eventually(t, "a Heal profile to report the template healed", func() (bool, string) {
			for _, p := range []string{"core", "api"} {
				c := condition(d.get(p), v1.ConditionDrifted)
				if c != nil && c.Reason == "Healed" && strings.Contains(c.Message, "/etc/systemd/system/agent-gateway@.service") {
					return true, ""
				}
			}
			return false, ""
		})
		eventually(t, "the template put back", func() (bool, string) { return d.read(template) == want, "" })
		d.unchanged(before, "core", "api", "rep")
	})

	t.Run("gateway killed and restarted by systemd", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		old := before["agent-gateway@core.service"]
		startBefore := d.get("core").Status.Alignment.StartTime
		if out, err := d.h.Exec(ctx, "kill", "-KILL", fmt.Sprint(old)); err != nil {
			t.Fatalf("kill: %v %s", err, out)
		}
		d.warned("core", since, fmt.Sprintf("MainPID: expected %d, found", old))
		gi := d.drifted("core", metav1.ConditionFalse, "Reproven", fmt.Sprintf("MainPID: expected %d", old))
		now := d.pids()["agent-gateway@core.service"]
		if now == 0 || now == old || gi.Status.MainPID != int64(now) {
			t.Errorf("status main PID %d, systemd's %d (was %d)", gi.Status.MainPID, now, old)
		}
		if a := gi.Status.Alignment; a == nil || a.StartTime == startBefore || a.CheckedAt == nil || a.CheckedAt.Time.Before(since.Truncate(time.Second)) {
			t.Errorf("no fresh proof of the new process: %+v", a)
		}
		if a := condition(gi, v1.ConditionAligned); a == nil || a.Status != metav1.ConditionTrue {
			t.Errorf("Aligned: %+v", a)
		}
		d.unchanged(before, "api", "rep")
	})

	t.Run("unit stopped by hand", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		d.systemctl("stop", "agent-gateway@core.service")
		// The first signal may show the unit still stopping (deactivating) or already stopped.
		d.warned("core", since, "ActiveState/SubState: expected active/running, found ")
		gi := d.drifted("core", metav1.ConditionFalse, "Healed", "ActiveState/SubState")
		now := d.pids()["agent-gateway@core.service"]
		if now == 0 || gi.Status.MainPID != int64(now) {
			t.Errorf("core not started again: status main PID %d, systemd's %d", gi.Status.MainPID, now)
		}
		d.unchanged(before, "api", "rep")
	})

	t.Run("every kind counted", func(t *testing.T) {
		for _, kind := range []string{"env", "link", "dropin", "process", "state"} {
			if n := driftCount(t, "core", kind); n < 1 {
				t.Errorf("gateway_agent_drift_total{profile=core,kind=%s} is %v", kind, n)
			}
		}
		if n := driftCount(t, "core", "unit") + driftCount(t, "api", "unit"); n < 1 {
			t.Errorf("gateway_agent_drift_total{kind=unit} is %v for the Heal profiles", n)
		}
	})
}

// driftCount reads gateway_agent_drift_total for a profile and kind from the agent's registry.
func driftCount(t *testing.T, profile, kind string) float64 {
	t.Helper()
	families, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "gateway_agent_drift_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["profile"] == profile && labels["kind"] == kind {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// TestDriftIsReported checks that a Report profile's host is left as found and that what changed
// is said at once: a weakening drop-in flips Isolated to False.
func TestDriftIsReported(t *testing.T) {
	d := startDriftHost(t, "drift-report")

	t.Run("env file edited", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		env := "opt/agent/gateways/rep/env"
		want := d.read(env)
		edited := want + "INJECTED=1\n"
		if err := os.WriteFile(d.on(env), []byte(edited), 0o600); err != nil {
			t.Fatal(err)
		}
		d.warned("rep", since, "env /opt/agent/gateways/rep/env: expected sha256:")
		d.drifted("rep", metav1.ConditionTrue, "Reported", "/opt/agent/gateways/rep/env")
		if got := d.read(env); got != edited {
			t.Errorf("a Report profile's env file was changed:\n%s", got)
		}
		d.unchanged(before, "core", "api", "rep")
		// Put back by hand: the condition says so.
		if err := os.WriteFile(d.on(env), []byte(want), 0o600); err != nil {
			t.Fatal(err)
		}
		d.drifted("rep", metav1.ConditionFalse, "NoDrift", "as rendered again")
	})

	t.Run("drop-in weakening the sandbox", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		weak := "etc/systemd/system/agent-gateway@rep.service.d/10-weaker.conf"
		d.write(weak, "[Service]\nProtectSystem=no\n")
		d.warned("rep", since, "/"+weak)
		gi := d.drifted("rep", metav1.ConditionTrue, "Reported", "/"+weak)
		if iso := condition(gi, v1.ConditionIsolated); iso == nil || iso.Status != metav1.ConditionFalse || iso.Reason != "Overridden" {
			t.Errorf("Isolated: %+v", iso)
		}
		if _, err := os.Stat(d.on(weak)); err != nil {
			t.Errorf("a Report profile's stray drop-in was moved: %v", err)
		}
		d.unchanged(before, "core", "api", "rep")
		if err := os.Remove(d.on(weak)); err != nil {
			t.Fatal(err)
		}
		d.drifted("rep", metav1.ConditionFalse, "NoDrift", "as rendered again")
		d.waitCondition("rep", "Isolated again", func(gi *v1.GatewayInstance) bool {
			c := condition(gi, v1.ConditionIsolated)
			return c != nil && c.Status == metav1.ConditionTrue
		})
	})

	t.Run("gateway killed: the new process is proven", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		old := before["agent-gateway@rep.service"]
		if out, err := d.h.Exec(context.Background(), "kill", "-KILL", fmt.Sprint(old)); err != nil {
			t.Fatalf("kill: %v %s", err, out)
		}
		d.warned("rep", since, fmt.Sprintf("MainPID: expected %d, found", old))
		gi := d.drifted("rep", metav1.ConditionFalse, "Reproven", fmt.Sprintf("MainPID: expected %d", old))
		if now := d.pids()["agent-gateway@rep.service"]; now == 0 || now == old || gi.Status.MainPID != int64(now) {
			t.Errorf("status main PID %d, systemd's %d (was %d)", gi.Status.MainPID, now, old)
		}
		d.unchanged(before, "core", "api")
	})

	t.Run("unit stopped by hand", func(t *testing.T) {
		d.t = t
		before, since := d.pids(), time.Now()
		d.systemctl("stop", "agent-gateway@rep.service")
		d.warned("rep", since, "ActiveState/SubState: expected active/running, found ")
		gi := d.drifted("rep", metav1.ConditionTrue, "Reported", "ActiveState/SubState")
		if r := condition(gi, v1.ConditionReady); r == nil || r.Status != metav1.ConditionFalse || gi.Status.MainPID != 0 {
			t.Errorf("a stopped gateway shows Ready %+v, main PID %d", r, gi.Status.MainPID)
		}
		if now := d.pids()["agent-gateway@rep.service"]; now != 0 {
			t.Errorf("a Report profile's stopped unit was started again (main PID %d)", now)
		}
		d.unchanged(before, "core", "api")
	})
}
