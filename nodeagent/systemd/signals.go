package systemd

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/godbus/dbus/v5"
)

// UnitSignal is one announcement from systemd: a unit's properties changed, a daemon-reload
// finished, or the signal connection was made again after being lost (then any change in
// between went unseen, and everything must be checked again).
type UnitSignal struct {
	// Unit is the unit whose properties changed; empty for Reloaded and Resync.
	Unit string
	// Properties names the properties systemd announced as changed (MainPID, ActiveState,
	// SubState, ...), changed or invalidated.
	Properties []string
	// Reloaded is set when a daemon-reload (or daemon-reexec) finished: drop-in paths and
	// NeedDaemonReload may have changed for every unit, and systemd does not announce those.
	Reloaded bool
	// Resync is set when the connection was made again after it was lost.
	Resync bool
}

// Unit object paths live under this prefix; the last element is the escaped unit name.
const unitPathPrefix = "/org/freedesktop/systemd1/unit/"

// WatchUnits delivers systemd's signals about units whose name starts with prefix (and every
// finished daemon-reload) to out until ctx ends. It has its own bus connection, separate from
// the one calls go through, and dials again when the bus is lost, sending a Resync signal once
// it is back. Nothing is polled: systemd sends the signals because this connection subscribed.
func (c *Conn) WatchUnits(ctx context.Context, prefix string, out chan<- UnitSignal) {
	resync := false
	for delay := 100 * time.Millisecond; ctx.Err() == nil; {
		// A lost connection needs no report of its own: the next one sends Resync.
		_ = c.watchOnce(ctx, prefix, out, resync)
		if ctx.Err() != nil {
			return
		}
		resync = true
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// watchOnce runs one signal connection until it is lost or ctx ends.
func (c *Conn) watchOnce(ctx context.Context, prefix string, out chan<- UnitSignal, resync bool) error {
	// The connection lives as long as ctx: godbus closes it when its context ends.
	bus, err := dialBus(ctx, c.address)
	if err != nil {
		return err
	}
	defer bus.Close()
	// Properties of units only (Unit and Service interfaces alike), and the manager's reloads.
	if err := bus.AddMatchSignalContext(ctx, dbus.WithMatchInterface("org.freedesktop.DBus.Properties"),
		dbus.WithMatchMember("PropertiesChanged"), dbus.WithMatchPathNamespace("/org/freedesktop/systemd1/unit")); err != nil {
		return err
	}
	if err := bus.AddMatchSignalContext(ctx, dbus.WithMatchInterface("org.freedesktop.systemd1.Manager"),
		dbus.WithMatchMember("Reloading")); err != nil {
		return err
	}
	ch := make(chan *dbus.Signal, 256)
	bus.Signal(ch)
	// systemd sends unit signals only while some client is subscribed.
	if err := bus.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1").
		CallWithContext(ctx, "org.freedesktop.systemd1.Manager.Subscribe", 0).Err; err != nil {
		return fmt.Errorf("systemd: subscribe: %w", err)
	}
	send := func(s UnitSignal) bool {
		select {
		case out <- s:
			return true
		case <-ctx.Done():
			return false
		}
	}
	if resync && !send(UnitSignal{Resync: true}) {
		return nil
	}
	for {
		var sig *dbus.Signal
		var ok bool
		select {
		case <-ctx.Done():
			return nil
		case sig, ok = <-ch:
			if !ok {
				return fmt.Errorf("systemd: the signal connection to %s was lost", c.address)
			}
		}
		if s, ok := parseSignal(sig, prefix); ok && !send(s) {
			return nil
		}
	}
}

// parseSignal turns a D-Bus signal into a UnitSignal, or reports false for one of no interest.
func parseSignal(sig *dbus.Signal, prefix string) (UnitSignal, bool) {
	switch sig.Name {
	case "org.freedesktop.systemd1.Manager.Reloading":
		// Sent with true when a reload starts and false when it is done.
		if len(sig.Body) == 1 {
			if starting, ok := sig.Body[0].(bool); ok && !starting {
				return UnitSignal{Reloaded: true}, true
			}
		}
		return UnitSignal{}, false
	case "org.freedesktop.DBus.Properties.PropertiesChanged":
		escaped, ok := strings.CutPrefix(string(sig.Path), unitPathPrefix)
		if !ok || strings.Contains(escaped, "/") {
			return UnitSignal{}, false
		}
		name := unescapePath(escaped)
		if !strings.HasPrefix(name, prefix) || len(sig.Body) < 3 {
			return UnitSignal{}, false
		}
		s := UnitSignal{Unit: name}
		if changed, ok := sig.Body[1].(map[string]dbus.Variant); ok {
			for k := range changed {
				s.Properties = append(s.Properties, k)
			}
		}
		if invalidated, ok := sig.Body[2].([]string); ok {
			s.Properties = append(s.Properties, invalidated...)
		}
		return s, true
	}
	return UnitSignal{}, false
}

// unescapePath reverses systemd's object-path escaping of a unit name ("_40" is "@").
func unescapePath(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '_' && i+2 < len(s) {
			var v byte
			if _, err := fmt.Sscanf(s[i+1:i+3], "%02x", &v); err == nil {
				b.WriteByte(v)
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// UnitState is what systemd holds about a unit that drift detection compares.
type UnitState struct {
	ActiveState, SubState string
	MainPID               uint32
	// DropInPaths are the drop-ins systemd loaded, paths inside the host.
	DropInPaths []string
	// NeedDaemonReload is true when a file of the unit changed on disk since systemd loaded it.
	NeedDaemonReload bool
}

// UnitState reads a service's state, main PID, loaded drop-ins and NeedDaemonReload.
func (c *Conn) UnitState(ctx context.Context, unit string) (UnitState, error) {
	props, err := c.bus().GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		return UnitState{}, fmt.Errorf("systemd: properties of %s: %w", unit, err)
	}
	var s UnitState
	s.ActiveState, _ = props["ActiveState"].(string)
	s.SubState, _ = props["SubState"].(string)
	s.DropInPaths, _ = props["DropInPaths"].([]string)
	s.NeedDaemonReload, _ = props["NeedDaemonReload"].(bool)
	if s.MainPID, err = c.MainPID(ctx, unit); err != nil {
		return UnitState{}, err
	}
	return s, nil
}
