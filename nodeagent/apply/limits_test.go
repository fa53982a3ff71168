package apply_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// TestResourceCapsReachSystemd: the caps an instance asks for (or the defaults) are what systemd
// holds for the running unit, read back over D-Bus, in both isolation modes; a changed cap
// restarts the gateway; a cap out of bounds is refused before anything on the host changes.
func TestResourceCapsReachSystemd(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	ctx := context.Background()
	limits := func(profile string) systemd.Limits {
		t.Helper()
		l, err := f.applier.Systemd.Limits(ctx, layout.Unit(profile))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}

	core := instance("core", r1)
	core.MemoryMax, core.TasksMax = 256<<20, 64
	first := f.mustApply(core)
	dev := instance("dev", r1)
	dev.Isolation = v1.IsolationConvenience
	f.mustApply(dev)
	for profile, want := range map[string]systemd.Limits{
		"core": {MemoryMax: 256 << 20, MemorySwapMax: 0, TasksMax: 64},
		"dev":  {MemoryMax: 1 << 30, MemorySwapMax: 0, TasksMax: v1.DefaultGatewayTasksMax},
	} {
		if got := limits(profile); got != want {
			t.Errorf("%s: systemd holds %+v, want %+v", profile, got, want)
		}
	}

	core.TasksMax = 100
	changed := f.mustApply(core)
	if !changed.Restarted || changed.MainPID == first.MainPID {
		t.Errorf("a changed tasksMax did not restart core (pid %d -> %d)", first.MainPID, changed.MainPID)
	}
	if got := limits("core"); got.TasksMax != 100 {
		t.Errorf("core's TasksMax = %d after the change, want 100", got.TasksMax)
	}

	dropIn := filepath.Join(f.host.Root, "etc/systemd/system/agent-gateway@core.service.d", layout.DropInName)
	before, err := os.ReadFile(dropIn)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		memory, tasks int64
		want          string
	}{
		{0, 1, "resources.tasksMax 1 is outside 16 to 65536"},
		{1 << 40, 0, "resources.memoryMax 1Ti is outside 64Mi to 64Gi"},
	} {
		in := core
		in.MemoryMax, in.TasksMax = bad.memory, bad.tasks
		_, err := f.applier.Apply(ctx, in)
		var fail *apply.Failure
		if !errors.As(err, &fail) || fail.Reason != "InvalidSpec" || !strings.Contains(fail.Message, bad.want) || fail.Retry {
			t.Errorf("apply with memoryMax %d, tasksMax %d: %v, want a final InvalidSpec failure saying %q", bad.memory, bad.tasks, err, bad.want)
		}
	}
	if after, err := os.ReadFile(dropIn); err != nil || string(after) != string(before) {
		t.Errorf("a refused cap changed the drop-in (%v):\n%s", err, after)
	}
	if got := f.mainPID("core"); got != changed.MainPID {
		t.Errorf("a refused cap restarted core (pid %d -> %d)", changed.MainPID, got)
	}
	if got := limits("core"); got.TasksMax != 100 || got.MemoryMax != 256<<20 {
		t.Errorf("core's caps changed after refused applies: %+v", got)
	}
}
