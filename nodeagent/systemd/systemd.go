// Package systemd drives one host's systemd over D-Bus. Every connection names its bus address
// explicitly: there is no fallback to the machine's own bus, so a test (or a misconfigured agent)
// can never restart units on a host it was not pointed at.
package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
)

// Conn is a connection to one systemd instance. When the bus connection is lost (dbus-daemon
// or systemd restarted, say), the next call dials again.
type Conn struct {
	address string
	mu      sync.Mutex
	conn    *sdbus.Conn
}

// Dial connects to the system bus at address, e.g.
// "unix:path=/run/dbus/system_bus_socket". The address is required.
func Dial(ctx context.Context, address string) (*Conn, error) {
	if address == "" {
		return nil, errors.New("systemd: a D-Bus address is required")
	}
	c, err := connect(ctx, address)
	if err != nil {
		return nil, err
	}
	return &Conn{address: address, conn: c}, nil
}

// redialTimeout bounds one attempt to reach the bus again.
const redialTimeout = 5 * time.Second

// bus returns the live connection, dialing again if the old one was lost. A failed redial
// returns the lost connection, whose calls then fail with a clear error.
func (c *Conn) bus() *sdbus.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn.Connected() {
		return c.conn
	}
	if fresh, err := c.redial(); err == nil {
		c.conn.Close()
		c.conn = fresh
	}
	return c.conn
}

// redial connects again, giving up after redialTimeout. The connection lives on after this
// returns, so its context is not the bounded one: the bound is kept here instead.
func (c *Conn) redial() (*sdbus.Conn, error) {
	type result struct {
		conn *sdbus.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := connect(context.Background(), c.address)
		done <- result{conn, err}
	}()
	select {
	case r := <-done:
		return r.conn, r.err
	case <-time.After(redialTimeout):
		go func() {
			if r := <-done; r.conn != nil {
				r.conn.Close()
			}
		}()
		return nil, fmt.Errorf("systemd: connect to %s again: no answer within %s", c.address, redialTimeout)
	}
}

// Ping checks that systemd answers on the bus (dialing again if the connection was lost).
func (c *Conn) Ping(ctx context.Context) error {
	_, err := c.SystemState(ctx)
	return err
}

// dialBus opens one authenticated connection to the bus at address.
func dialBus(ctx context.Context, address string) (*dbus.Conn, error) {
	c, err := dbus.Dial(address, dbus.WithContext(ctx))
	if err != nil {
		return nil, err
	}
	// EXTERNAL authentication by numeric uid: no user-name lookup is needed.
	if err := c.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.Hello(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func connect(ctx context.Context, address string) (*sdbus.Conn, error) {
	c, err := sdbus.NewConnection(func() (*dbus.Conn, error) { return dialBus(ctx, address) })
	if err != nil {
		return nil, fmt.Errorf("systemd: connect to %s: %w", address, err)
	}
	return c, nil
}

// Close closes the connection.
func (c *Conn) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn.Close()
}

// JobError is a systemd job that finished with a result other than "done".
type JobError struct {
	Verb, Unit, Result string
}

func (e *JobError) Error() string {
	return fmt.Sprintf("systemd: %s %s: job finished %q", e.Verb, e.Unit, e.Result)
}

type jobFunc func(ctx context.Context, name, mode string, ch chan<- string) (int, error)

// runJob queues a job in "replace" mode and waits for its result.
func (c *Conn) runJob(ctx context.Context, verb string, fn jobFunc, unit string) error {
	// Buffered: go-systemd delivers the result from its signal loop and must never block on us.
	done := make(chan string, 1)
	if _, err := fn(ctx, unit, "replace", done); err != nil {
		return fmt.Errorf("systemd: %s %s: %w", verb, unit, err)
	}
	select {
	case result := <-done:
		if result != "done" {
			return &JobError{Verb: verb, Unit: unit, Result: result}
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("systemd: %s %s: %w", verb, unit, ctx.Err())
	}
}

// Start starts unit and waits for the job's result.
func (c *Conn) Start(ctx context.Context, unit string) error {
	return c.runJob(ctx, "start", c.bus().StartUnitContext, unit)
}

// Restart restarts unit (starting it if it is stopped) and waits for the job's result.
func (c *Conn) Restart(ctx context.Context, unit string) error {
	return c.runJob(ctx, "restart", c.bus().RestartUnitContext, unit)
}

// Stop stops unit and waits for the job's result.
func (c *Conn) Stop(ctx context.Context, unit string) error {
	return c.runJob(ctx, "stop", c.bus().StopUnitContext, unit)
}

// Reload makes systemd re-read its unit files (daemon-reload).
func (c *Conn) Reload(ctx context.Context) error {
	if err := c.bus().ReloadContext(ctx); err != nil {
		return fmt.Errorf("systemd: daemon-reload: %w", err)
	}
	return nil
}

// MainPID returns the main process of a service as systemd sees it (in systemd's own PID
// namespace), or 0 when the service is not running.
func (c *Conn) MainPID(ctx context.Context, unit string) (uint32, error) {
	p, err := c.bus().GetServicePropertyContext(ctx, unit, "MainPID")
	if err != nil {
		return 0, fmt.Errorf("systemd: MainPID of %s: %w", unit, err)
	}
	pid, ok := p.Value.Value().(uint32)
	if !ok {
		return 0, fmt.Errorf("systemd: MainPID of %s has type %T", unit, p.Value.Value())
	}
	return pid, nil
}

// ActiveState returns a unit's ActiveState ("active", "failed", "inactive" ...).
func (c *Conn) ActiveState(ctx context.Context, unit string) (string, error) {
	p, err := c.bus().GetUnitPropertyContext(ctx, unit, "ActiveState")
	if err != nil {
		return "", fmt.Errorf("systemd: ActiveState of %s: %w", unit, err)
	}
	s, _ := p.Value.Value().(string)
	return s, nil
}

// SystemState returns the manager's state: "initializing", "starting", "running", "degraded" ...
func (c *Conn) SystemState(ctx context.Context) (string, error) {
	p, err := c.bus().SystemStateContext(ctx)
	if err != nil {
		return "", fmt.Errorf("systemd: SystemState: %w", err)
	}
	s, _ := p.Value.Value().(string)
	return s, nil
}

// Version returns systemd's version string, e.g. "252.38-1~deb12u1".
func (c *Conn) Version() (string, error) {
	v, err := c.bus().GetManagerProperty("Version")
	if err != nil {
		return "", fmt.Errorf("systemd: Version: %w", err)
	}
	return strings.Trim(v, `"`), nil
}

// UnitFiles returns the unit's fragment file followed by every drop-in systemd loaded for it,
// as paths inside the host: what `systemctl cat` would show.
func (c *Conn) UnitFiles(ctx context.Context, unit string) ([]string, error) {
	props, err := c.bus().GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		return nil, fmt.Errorf("systemd: properties of %s: %w", unit, err)
	}
	var files []string
	if f, _ := props["FragmentPath"].(string); f != "" {
		files = append(files, f)
	}
	if d, ok := props["DropInPaths"].([]string); ok {
		files = append(files, d...)
	}
	return files, nil
}

// Environment returns the Environment= assignments systemd holds for a service.
func (c *Conn) Environment(ctx context.Context, unit string) ([]string, error) {
	p, err := c.bus().GetServicePropertyContext(ctx, unit, "Environment")
	if err != nil {
		return nil, fmt.Errorf("systemd: Environment of %s: %w", unit, err)
	}
	env, _ := p.Value.Value().([]string)
	return env, nil
}

// RunningInstances returns the MainPID of every active unit matching pattern, by unit name.
func (c *Conn) RunningInstances(ctx context.Context, pattern string) (map[string]uint32, error) {
	units, err := c.bus().ListUnitsByPatternsContext(ctx, []string{"active", "activating", "reloading"}, []string{pattern})
	if err != nil {
		return nil, fmt.Errorf("systemd: list %s: %w", pattern, err)
	}
	pids := make(map[string]uint32, len(units))
	for _, u := range units {
		pid, err := c.MainPID(ctx, u.Name)
		if err != nil {
			return nil, err
		}
		pids[u.Name] = pid
	}
	return pids, nil
}

// Enable makes a unit start at boot, as `systemctl enable` does.
func (c *Conn) Enable(ctx context.Context, unit string) error {
	if _, _, err := c.bus().EnableUnitFilesContext(ctx, []string{unit}, false, true); err != nil {
		return fmt.Errorf("systemd: enable %s: %w", unit, err)
	}
	return nil
}

// Disable undoes Enable.
func (c *Conn) Disable(ctx context.Context, unit string) error {
	if _, err := c.bus().DisableUnitFilesContext(ctx, []string{unit}, false); err != nil {
		return fmt.Errorf("systemd: disable %s: %w", unit, err)
	}
	return nil
}

// ResetFailed clears a unit's failed state so that it can be started again at once.
func (c *Conn) ResetFailed(ctx context.Context, unit string) error {
	return c.bus().ResetFailedUnitContext(ctx, unit)
}

// ControlGroup returns a unit's control group path as systemd reports it (relative to systemd's
// own cgroup namespace), or "" when the unit has none (it is not running).
func (c *Conn) ControlGroup(ctx context.Context, unit string) (string, error) {
	p, err := c.bus().GetServicePropertyContext(ctx, unit, "ControlGroup")
	if err != nil {
		return "", fmt.Errorf("systemd: ControlGroup of %s: %w", unit, err)
	}
	s, _ := p.Value.Value().(string)
	return s, nil
}

// Limits are the resource caps systemd holds for a service; math.MaxUint64 means "infinity".
type Limits struct {
	MemoryMax, MemorySwapMax, TasksMax uint64
}

// Limits reads a service's MemoryMax, MemorySwapMax and TasksMax as systemd loaded them.
func (c *Conn) Limits(ctx context.Context, unit string) (Limits, error) {
	props, err := c.bus().GetUnitTypePropertiesContext(ctx, unit, "Service")
	if err != nil {
		return Limits{}, fmt.Errorf("systemd: limits of %s: %w", unit, err)
	}
	var l Limits
	for name, dst := range map[string]*uint64{"MemoryMax": &l.MemoryMax, "MemorySwapMax": &l.MemorySwapMax, "TasksMax": &l.TasksMax} {
		v, ok := props[name].(uint64)
		if !ok {
			return Limits{}, fmt.Errorf("systemd: %s of %s has type %T", name, unit, props[name])
		}
		*dst = v
	}
	return l, nil
}

// ServiceProperties returns every property of a service's org.freedesktop.systemd1.Service
// interface: the effective settings systemd runs it with, after every drop-in.
func (c *Conn) ServiceProperties(ctx context.Context, unit string) (map[string]any, error) {
	props, err := c.bus().GetUnitTypePropertiesContext(ctx, unit, "Service")
	if err != nil {
		return nil, fmt.Errorf("systemd: properties of %s: %w", unit, err)
	}
	return props, nil
}

// RunOnce runs a Type=oneshot service with RemainAfterExit=yes once more, waits until it has
// finished, reads the exit status of its main process and stops it again. RemainAfterExit keeps
// the finished unit loaded, so its exit status can be read before systemd unloads it. If ctx
// ends first the run is stopped. A run whose main process did not exit by itself (killed, or
// never started) is an error; a process that systemd could not start reports systemd's own exit
// status (203 for exec, 217 for user, ...).
func (c *Conn) RunOnce(ctx context.Context, unit string) (int, error) {
	before, err := c.mainExit(ctx, unit)
	if err != nil {
		return 0, err
	}
	// Whatever happens, leave the unit stopped and not failed, within a bound of its own.
	defer func() {
		stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = c.Stop(stopCtx, unit)
		_ = c.ResetFailed(stopCtx, unit)
	}()
	// Restart, not Start: a run left active by an interrupted caller must not stand in for this one.
	err = c.Restart(ctx, unit)
	var job *JobError
	if err != nil && !errors.As(err, &job) {
		return 0, err
	}
	after, err2 := c.mainExit(ctx, unit)
	switch {
	case err2 != nil:
		return 0, err2
	case after.at == before.at:
		return 0, errors.Join(fmt.Errorf("systemd: %s finished without running its main process", unit), err)
	case after.code != cldExited:
		return 0, fmt.Errorf("systemd: %s: main process did not exit by itself (code %d, status %d)", unit, after.code, after.status)
	}
	return int(after.status), nil
}

// cldExited is the si_code systemd reports in ExecMainCode for a process that exited by itself.
const cldExited = 1

type mainExit struct {
	code, status int32
	at           uint64
}

// mainExit reads how and when a service's main process last exited.
func (c *Conn) mainExit(ctx context.Context, unit string) (mainExit, error) {
	props, err := c.ServiceProperties(ctx, unit)
	if err != nil {
		return mainExit{}, err
	}
	code, ok1 := props["ExecMainCode"].(int32)
	status, ok2 := props["ExecMainStatus"].(int32)
	at, ok3 := props["ExecMainExitTimestampMonotonic"].(uint64)
	if !ok1 || !ok2 || !ok3 {
		return mainExit{}, fmt.Errorf("systemd: %s reports no main process exit (ExecMainCode %T, ExecMainStatus %T, ExecMainExitTimestampMonotonic %T)",
			unit, props["ExecMainCode"], props["ExecMainStatus"], props["ExecMainExitTimestampMonotonic"])
	}
	return mainExit{code: code, status: status, at: at}, nil
}
