package systemd

import (
	"slices"
	"testing"

	"github.com/godbus/dbus/v5"
)

func TestParseSignalKeepsOnlyGatewayUnitsAndFinishedReloads(t *testing.T) {
	props := func(path string, changed map[string]dbus.Variant, invalidated []string) *dbus.Signal {
		return &dbus.Signal{Name: "org.freedesktop.DBus.Properties.PropertiesChanged", Path: dbus.ObjectPath(path),
			Body: []any{"org.freedesktop.systemd1.Service", changed, invalidated}}
	}
	s, ok := parseSignal(props("/org/freedesktop/systemd1/unit/agent_2dgateway_40my_2dapi_2eservice",
		map[string]dbus.Variant{"MainPID": dbus.MakeVariant(uint32(7))}, []string{"ExecMainStartTimestamp"}), "agent-gateway@")
	if !ok || s.Unit != "agent-gateway@my-api.service" || !slices.Contains(s.Properties, "MainPID") || !slices.Contains(s.Properties, "ExecMainStartTimestamp") {
		t.Errorf("gateway unit signal: %+v %v", s, ok)
	}
	if _, ok := parseSignal(props("/org/freedesktop/systemd1/unit/agent_2dgateway_2dprobe_40core_2eservice", nil, nil), "agent-gateway@"); ok {
		t.Error("the isolation probe's unit is not a gateway")
	}
	if _, ok := parseSignal(props("/org/freedesktop/systemd1/unit/cron_2eservice", nil, nil), "agent-gateway@"); ok {
		t.Error("another unit's signal was kept")
	}
	reload := func(starting bool) *dbus.Signal {
		return &dbus.Signal{Name: "org.freedesktop.systemd1.Manager.Reloading", Path: "/org/freedesktop/systemd1", Body: []any{starting}}
	}
	if s, ok := parseSignal(reload(false), "agent-gateway@"); !ok || !s.Reloaded {
		t.Errorf("finished reload: %+v %v", s, ok)
	}
	if _, ok := parseSignal(reload(true), "agent-gateway@"); ok {
		t.Error("a reload that only starts was kept")
	}
}
