package systemd

import (
	"context"
	"fmt"
	"syscall"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
)

// Property is one property of a transient unit, as systemd's D-Bus API names it
// (MemoryMax, TasksMax, ExecStart ...).
type Property = sdbus.Property

// StartTransient creates a transient unit from props and waits for its start job. systemd
// forgets the unit when it stops, unless props keep it (RemainAfterExit, CollectMode).
func (c *Conn) StartTransient(ctx context.Context, unit string, props []Property) error {
	start := func(ctx context.Context, name, mode string, ch chan<- string) (int, error) {
		return c.bus().StartTransientUnitContext(ctx, name, mode, props, ch)
	}
	return c.runJob(ctx, "start transient", start, unit)
}

// Kill sends sig to every process of unit.
func (c *Conn) Kill(ctx context.Context, unit string, sig syscall.Signal) error {
	if err := c.bus().KillUnitWithTarget(ctx, unit, sdbus.All, int32(sig)); err != nil { //nolint:gosec // signal numbers are below 65
		return fmt.Errorf("systemd: kill %s: %w", unit, err)
	}
	return nil
}

// LoadState returns a unit's LoadState: "loaded", or "not-found" once systemd has no such
// unit (a transient unit that stopped and was collected).
func (c *Conn) LoadState(ctx context.Context, unit string) (string, error) {
	units, err := c.bus().ListUnitsByNamesContext(ctx, []string{unit})
	if err != nil {
		return "", fmt.Errorf("systemd: LoadState of %s: %w", unit, err)
	}
	if len(units) == 0 {
		return "not-found", nil
	}
	return units[0].LoadState, nil
}
