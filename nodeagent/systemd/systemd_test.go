package systemd_test

import (
	"context"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// TestConnDialsAgainAfterTheBusRestarts: when the host's dbus-daemon restarts, the agent's
// connection is lost; the next call dials again instead of failing for good. While the bus is
// down, Ping (the agent's liveness check) fails.
func TestConnDialsAgainAfterTheBusRestarts(t *testing.T) {
	h := systemdhost.Start(t, systemdhost.Options{})
	c := h.Dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if out, err := h.Exec(ctx, "pkill", "-KILL", "-x", "dbus-daemon"); err != nil {
		t.Fatalf("kill dbus-daemon: %v\n%s", err, out)
	}
	// dbus-daemon is socket-activated: systemd starts it again on the next connection.
	var err error
	for {
		if err = c.Ping(ctx); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the connection never came back after the bus restarted: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	if _, err := c.MainPID(ctx, "dbus.service"); err != nil {
		t.Fatalf("a call after the redial: %v", err)
	}
}

// TestPingFailsWhileSystemdIsGone: the agent's liveness check (Ping) fails once the host's
// systemd and bus are gone, and does not hang.
func TestPingFailsWhileSystemdIsGone(t *testing.T) {
	h := systemdhost.Start(t, systemdhost.Options{})
	c := h.Dial(t)
	if err := h.Stop(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Ping(ctx); err == nil {
		t.Fatal("Ping succeeded with the host's systemd gone")
	}
}
