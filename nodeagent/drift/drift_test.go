package drift

import (
	"maps"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

func TestCompareNamesEveryDifference(t *testing.T) {
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	vendor := "/usr/lib/systemd/system/service.d/10-timeout-abort.conf"
	exp := Expected{
		Profile: p,
		Files: map[string]string{p.Env: "sha256:aa", p.DropIn: "sha256:bb", p.Current: "link:../../releases/x",
			"/etc/systemd/system/agent-gateway@.service": "sha256:cc", "/run/systemd/system/agent-gateway@core.service": Absent},
		DropIns: map[string]string{vendor: "sha256:dd"},
		Loaded:  []string{p.DropIn, vendor},
		MainPID: 10,
	}
	running := UnitFacts{ActiveState: "active", SubState: "running", MainPID: 10, Loaded: []string{vendor, p.DropIn}}
	same := func() Found {
		return Found{Files: maps.Clone(exp.Files), DropIns: map[string]string{p.DropIn: "sha256:bb", vendor: "sha256:dd"}, Unit: running}
	}
	cases := []struct {
		name   string
		change func(*Found)
		want   []string // one substring per finding, in order
	}{
		{"nothing changed", func(*Found) {}, nil},
		{"env edited", func(f *Found) { f.Files[p.Env] = "sha256:ee" },
			[]string{"env /opt/agent/gateways/core/env: expected sha256:aa, found sha256:ee"}},
		{"current flipped", func(f *Found) { f.Files[p.Current] = "link:../../releases/y" },
			[]string{"link /opt/agent/gateways/core/current: expected link:../../releases/x, found link:../../releases/y"}},
		{"template edited", func(f *Found) { f.Files["/etc/systemd/system/agent-gateway@.service"] = "sha256:ff" },
			[]string{"unit /etc/systemd/system/agent-gateway@.service"}},
		{"an instance unit file appears", func(f *Found) { f.Files["/run/systemd/system/agent-gateway@core.service"] = "sha256:01" },
			[]string{"unit /run/systemd/system/agent-gateway@core.service: expected nothing, found sha256:01"}},
		{"a drop-in in the agent's folder", func(f *Found) { f.DropIns["/etc/systemd/system/agent-gateway@core.service.d/90-x.conf"] = "sha256:02" },
			[]string{"dropin /etc/systemd/system/agent-gateway@core.service.d/90-x.conf: expected nothing, found sha256:02"}},
		{"a drop-in in the template's folder", func(f *Found) { f.DropIns["/etc/systemd/system/agent-gateway@.service.d/x.conf"] = "sha256:03" },
			[]string{"dropin /etc/systemd/system/agent-gateway@.service.d/x.conf"}},
		{"a drop-in for every service", func(f *Found) { f.DropIns["/etc/systemd/system/service.d/x.conf"] = "sha256:04" },
			[]string{"dropin /etc/systemd/system/service.d/x.conf: expected nothing, found sha256:04"}},
		{"a vendor drop-in changed", func(f *Found) { f.DropIns[vendor] = "sha256:05" },
			[]string{"dropin " + vendor + ": expected sha256:dd, found sha256:05"}},
		{"a vendor drop-in removed", func(f *Found) { delete(f.DropIns, vendor) },
			[]string{"dropin " + vendor + ": expected sha256:dd, found nothing"}},
		{"the agent's drop-in edited", func(f *Found) { f.Files[p.DropIn] = "sha256:06"; f.DropIns[p.DropIn] = "sha256:06" },
			[]string{"dropin /etc/systemd/system/agent-gateway@core.service.d/50-gateway-operator.conf: expected sha256:bb, found sha256:06"}},
		{"restarted by systemd", func(f *Found) { f.Unit.MainPID = 11 },
			[]string{"process agent-gateway@core.service MainPID: expected 10, found 11"}},
		{"stopped", func(f *Found) { f.Unit = UnitFacts{ActiveState: "inactive", SubState: "dead", Loaded: running.Loaded} },
			[]string{"state agent-gateway@core.service ActiveState/SubState: expected active/running, found inactive/dead"}},
		{"loaded another drop-in", func(f *Found) { f.Unit.Loaded = append(f.Unit.Loaded, "/run/x.conf") },
			[]string{"loaded agent-gateway@core.service DropInPaths"}},
		{"needs a reload", func(f *Found) { f.Unit.NeedDaemonReload = true },
			[]string{"loaded agent-gateway@core.service NeedDaemonReload: expected false, found true"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := same()
			c.change(&f)
			got := Compare(exp, f)
			if len(got) != len(c.want) {
				t.Fatalf("findings %v, want %d", got, len(c.want))
			}
			for i, w := range c.want {
				if !strings.Contains(got[i].String(), w) {
					t.Errorf("finding %d is %q, want it to contain %q", i, got[i], w)
				}
			}
		})
	}
}

func TestUnitFilesPutTheTemplateLast(t *testing.T) {
	p, _ := layout.ForProfile("core")
	files := UnitFiles(p)
	if files[len(files)-1] != "/etc/systemd/system/agent-gateway@.service" {
		t.Errorf("last unit file %s", files[len(files)-1])
	}
	for _, f := range files[:len(files)-1] {
		if f == "/usr/lib/systemd/system/agent-gateway@.service" {
			t.Error("a template below /etc/systemd/system does not replace it, yet is expected absent")
		}
	}
}
