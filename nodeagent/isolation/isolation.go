// Package isolation gathers the evidence behind a GatewayInstance's Isolated condition on one
// host. Nothing of it comes from the gateway: the agent reads the unit's effective sandbox back
// from systemd, runs a probe of its own as the profile's user inside that same sandbox (see
// package probe), and measures the unit's exposure score. Each of these is a named check;
// Isolated is true only when every check passed.
package isolation

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/renameio/v2"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/isolation/probe"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

// Names of the checks besides the property checks, in the order they are reported.
const (
	// CheckProductionMode fails for a profile that is not in Production isolation mode.
	CheckProductionMode = "ProductionMode"
	// CheckProbeSandbox: the probe unit runs under the same effective properties as rendered.
	CheckProbeSandbox = "ProbeSandbox"
	// CheckProbeRan: the probe ran to its end and reported.
	CheckProbeRan = "ProbeRan"
	// CheckSiblingHomes: no sibling's home could be listed from the sandbox.
	CheckSiblingHomes = "SiblingHomesUnreadable"
	// CheckSiblingEnvFiles: no sibling's env file could be read from the sandbox.
	CheckSiblingEnvFiles = "SiblingEnvFilesUnreadable"
	// CheckEtcReadOnly: /etc is a read-only mount in the sandbox.
	CheckEtcReadOnly = "EtcReadOnly"
	// CheckEgressDenied: a connection to a local address outside the allowlist was dropped.
	CheckEgressDenied = "EgressDenied"
	// CheckNoCapabilities: the sandboxed process holds no capability in any set.
	CheckNoCapabilities = "NoCapabilities"
	// CheckExposure: `systemd-analyze security` scores the unit under the threshold.
	CheckExposure = "ExposureScore"
)

// Check is one piece of evidence.
type Check struct {
	Name    string
	Passed  bool
	Message string
}

// Evidence is the outcome of one Verify.
type Evidence struct {
	// Checks lists every check in a fixed order.
	Checks []Check
	// Isolated is true when every check passed.
	Isolated bool
	// Failed names the first check that failed, for the Isolated condition's message.
	Failed string
	// ExposureScore is the measured score ("1.1"), empty when it could not be measured.
	ExposureScore string
}

// Check returns the check with the given name.
func (e Evidence) Check(name string) (Check, bool) {
	for _, c := range e.Checks {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

// Message is a one-line summary for the Isolated condition.
func (e Evidence) Message() string {
	if e.Isolated {
		return fmt.Sprintf("all %d isolation checks passed on the host (exposure score %s)", len(e.Checks), e.ExposureScore)
	}
	c, _ := e.Check(e.Failed)
	return "isolation check " + c.Name + " failed: " + c.Message
}

func newEvidence(checks []Check, score string) Evidence {
	e := Evidence{Checks: checks, Isolated: len(checks) > 0, ExposureScore: score}
	for _, c := range checks {
		if !c.Passed {
			e.Isolated = false
			e.Failed = c.Name
			break
		}
	}
	return e
}

// Defaults of the Verifier's settings.
const (
	DefaultMaxExposure     = 2.0
	DefaultProbeTimeout    = 20 * time.Second
	DefaultConnectTimeout  = 250 * time.Millisecond
	DefaultExposureTimeout = 30 * time.Second
)

// Verifier gathers isolation evidence on one host. Verify may be called for different profiles
// at the same time, but not twice at once for the same profile.
type Verifier struct {
	// Systemd is a connection to the host's systemd.
	Systemd *systemd.Conn
	// Host is the root prefix of the host's filesystem.
	Host layout.Host
	// MaxExposure is the exposure score the unit must stay under; DefaultMaxExposure when zero.
	MaxExposure float64
	// ProbeTimeout bounds one probe run from its start job to its exit; DefaultProbeTimeout when
	// zero.
	ProbeTimeout time.Duration
	// ConnectTimeout bounds the probe's connection attempt: a dropped connection costs this
	// much. The target is local, so an answer (accept or refusal) comes within the connect
	// call itself; DefaultConnectTimeout when zero.
	ConnectTimeout time.Duration
	// ExposureTimeout bounds one `systemd-analyze security`; DefaultExposureTimeout when zero.
	ExposureTimeout time.Duration

	mu     sync.Mutex
	scores map[string]string // exposure score by digest of the unit's files
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Install writes the probe's template unit and the profile's probe drop-in, and reports whether
// either changed; systemd must then be reloaded before the probe runs. Verify calls it itself;
// an apply that writes the gateway's drop-in can call it too, so one daemon-reload covers both.
func Install(host layout.Host, p layout.Profile, s unit.Settings) (bool, error) {
	for _, d := range []struct {
		dir  string
		mode os.FileMode
	}{{layout.UnitDir, 0o755}, {path.Dir(layout.ProbeDropIn(p.Name)), 0o755}, {layout.ProbeDir, 0o700}} {
		if err := os.MkdirAll(host.On(d.dir), d.mode); err != nil { //nolint:gosec // unit folders are world-readable by convention; the probe's own is 0700
			return false, err
		}
	}
	t, err := writeIfChanged(host.On(path.Join(layout.UnitDir, layout.ProbeTemplateUnit)), unit.ProbeTemplate(), 0o644)
	if err != nil {
		return false, err
	}
	d, err := writeIfChanged(host.On(layout.ProbeDropIn(p.Name)), unit.ProbeDropIn(s), 0o644)
	return t || d, err
}

// Uninstall removes a profile's probe drop-in and arguments; the caller reloads systemd.
func Uninstall(host layout.Host, profile string) error {
	if _, err := layout.ForProfile(profile); err != nil {
		return err
	}
	return errors.Join(
		os.RemoveAll(host.On(path.Dir(layout.ProbeDropIn(profile)))),
		ignoreMissing(os.Remove(host.On(layout.ProbeEnv(profile)))),
	)
}

func ignoreMissing(err error) error {
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// writeIfChanged writes a root-owned file atomically unless it already holds text.
func writeIfChanged(file, text string, mode os.FileMode) (bool, error) {
	if old, err := os.ReadFile(file); err == nil && string(old) == text { //nolint:gosec // root-owned files of the host layout
		return false, nil
	}
	return true, renameio.WriteFile(file, []byte(text), mode)
}

// Siblings lists every other profile that has a folder on the host.
func Siblings(host layout.Host, self string) ([]layout.Profile, error) {
	entries, err := os.ReadDir(host.On(layout.GatewaysDir))
	if err != nil {
		return nil, err
	}
	var out []layout.Profile
	for _, e := range entries {
		if !e.IsDir() || e.Name() == self {
			continue
		}
		if p, err := layout.ForProfile(e.Name()); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// Verify gathers the evidence that profile p, rendered from s, is isolated on the host:
// the unit's effective properties against the rendered drop-in, the probe run inside the same
// sandbox against siblings, /etc, an address outside the allowlist and the capability sets, and
// the exposure score. A check that fails is evidence, not an error; an error means the agent could
// not gather the evidence at all (systemd unreachable, the probe files not writable).
func (v *Verifier) Verify(ctx context.Context, p layout.Profile, s unit.Settings, siblings []layout.Profile) (Evidence, error) {
	if s.Isolation != v1.IsolationProduction {
		return newEvidence([]Check{{Name: CheckProductionMode, Message: fmt.Sprintf("isolation mode is %s: profiles share one user and are not isolated from each other", s.Isolation)}}, ""), nil
	}
	want, err := parseDropIn(unit.DropIn(s))
	if err != nil {
		return Evidence{}, err
	}
	checks := []Check{{Name: CheckProductionMode, Passed: true, Message: "Production isolation mode"}}

	props, err := v.Systemd.ServiceProperties(ctx, p.Unit)
	if err != nil {
		return Evidence{}, err
	}
	checks = append(checks, compareProperties(want, props)...)

	changed, err := Install(v.Host, p, s)
	if err != nil {
		return Evidence{}, fmt.Errorf("install the isolation probe: %w", err)
	}
	if changed {
		if err := v.Systemd.Reload(ctx); err != nil {
			return Evidence{}, err
		}
	}
	probeUnit := layout.ProbeUnit(p.Name)
	probeProps, err := v.Systemd.ServiceProperties(ctx, probeUnit)
	if err != nil {
		return Evidence{}, err
	}
	checks = append(checks, sandboxCheck(compareProperties(want, probeProps)))

	probeChecks, err := v.runProbe(ctx, p, want.allow, siblings)
	if err != nil {
		return Evidence{}, err
	}
	checks = append(checks, probeChecks...)

	score, exposure := v.exposure(ctx, p.Unit)
	checks = append(checks, exposure)
	return newEvidence(checks, score), nil
}

// sandboxCheck sums up the probe unit's property checks: the probe proves something only if it
// ran in the sandbox that was rendered for the gateway.
func sandboxCheck(checks []Check) Check {
	var bad []string
	for _, c := range checks {
		if !c.Passed {
			bad = append(bad, c.Message)
		}
	}
	if len(bad) > 0 {
		return Check{Name: CheckProbeSandbox, Message: "the probe unit differs from the rendered sandbox: " + strings.Join(bad, "; ")}
	}
	return Check{Name: CheckProbeSandbox, Passed: true, Message: "the probe unit runs under the rendered sandbox"}
}

// runProbe runs the profile's probe once and turns its exit status into checks.
func (v *Verifier) runProbe(ctx context.Context, p layout.Profile, allow []netip.Prefix, siblings []layout.Profile) ([]Check, error) {
	cfg := probe.Config{ReadOnly: []string{"/etc"}, ConnectTimeout: orDefault(v.ConnectTimeout, DefaultConnectTimeout)}
	var names []string
	for _, s := range siblings {
		cfg.Homes = append(cfg.Homes, s.Home)
		cfg.Files = append(cfg.Files, s.Env)
		names = append(names, s.Name)
	}
	tgt, err := listenOutside(allow)
	if err == nil {
		defer tgt.close()
		cfg.Connect = []string{tgt.addr}
	}
	envText, err := cfg.EnvFile()
	if err != nil {
		return nil, err
	}
	if err := renameio.WriteFile(v.Host.On(layout.ProbeEnv(p.Name)), []byte(envText), 0o600); err != nil {
		return nil, fmt.Errorf("write the probe's arguments: %w", err)
	}

	runCtx, cancel := context.WithTimeout(ctx, orDefault(v.ProbeTimeout, DefaultProbeTimeout))
	defer cancel()
	status, runErr := v.Systemd.RunOnce(runCtx, layout.ProbeUnit(p.Name))
	accepted := tgt.close()
	return probeChecks(status, runErr, names, tgt.addr, accepted), nil
}

// probeChecks turns a probe's exit status into checks. addr is the address it tried to reach
// ("" when none lay outside the allowlist) and accepted counts the connections that arrived there.
func probeChecks(status int, runErr error, siblings []string, addr string, accepted int64) []Check {
	ran := Check{Name: CheckProbeRan, Passed: true, Message: "the probe ran as the profile's user and reported"}
	switch {
	case runErr != nil:
		ran = Check{Name: CheckProbeRan, Message: "the probe did not finish: " + runErr.Error()}
	case status == probe.ExitUsage:
		ran = Check{Name: CheckProbeRan, Message: "the probe rejected its arguments"}
	case status > probe.MaxStatus:
		ran = Check{Name: CheckProbeRan, Message: fmt.Sprintf("the probe could not start: exit status %d (see the journal of its unit)", status)}
	}
	if !ran.Passed {
		checks := []Check{ran}
		for _, n := range []string{CheckSiblingHomes, CheckSiblingEnvFiles, CheckEtcReadOnly, CheckEgressDenied, CheckNoCapabilities} {
			checks = append(checks, Check{Name: n, Message: "not checked: the probe did not run"})
		}
		return checks
	}
	who := "(no sibling profile on this host)"
	if len(siblings) > 0 {
		who = "(" + strings.Join(siblings, ", ") + ")"
	}
	bit := func(name string, b int, held, failed string) Check {
		if status&b != 0 {
			return Check{Name: name, Message: failed}
		}
		return Check{Name: name, Passed: true, Message: held}
	}
	egress := bit(CheckEgressDenied, probe.Connected, "a connection to "+addr+", outside the allowlist, was dropped",
		"a connection to "+addr+", outside the allowlist, reached the network")
	switch {
	case addr == "":
		egress = Check{Name: CheckEgressDenied, Message: "the allowlist covers every local address, so no dropped connection could be shown"}
	case accepted > 0:
		egress = Check{Name: CheckEgressDenied, Message: fmt.Sprintf("%s, outside the allowlist, accepted %d connection(s) during the probe", addr, accepted)}
	}
	return []Check{ran,
		bit(CheckSiblingHomes, probe.HomeReadable, "no sibling's home could be listed "+who, "a sibling's home could be listed "+who),
		bit(CheckSiblingEnvFiles, probe.FileReadable, "no sibling's env file could be read "+who, "a sibling's env file could be read "+who),
		bit(CheckEtcReadOnly, probe.Writable, "/etc is a read-only mount", "/etc is not a read-only mount"),
		egress,
		bit(CheckNoCapabilities, probe.Capable, "every capability set is empty", "the sandboxed process holds capabilities"),
	}
}

// target is a TCP listener the probe must not reach; it counts what reaches it anyway.
type target struct {
	addr     string
	ln       net.Listener
	accepted atomic.Int64
	done     chan struct{}
	once     sync.Once
}

// listenOutside listens on the first local address the allowlist does not cover: a loopback
// address when it can, so the attempt never leaves the host.
func listenOutside(allow []netip.Prefix) (*target, error) {
	// 127.0.0.2 serves when only 127.0.0.1 is allowed: all of 127/8 is local on Linux.
	candidates := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("::1")}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && !ip.IsLoopback() {
					candidates = append(candidates, ip.Unmap())
				}
			}
		}
	}
	for _, a := range candidates {
		if allows(allow, a) {
			continue
		}
		ln, err := net.Listen("tcp", netip.AddrPortFrom(a, 0).String())
		if err != nil {
			continue
		}
		t := &target{addr: ln.Addr().String(), ln: ln, done: make(chan struct{})}
		go t.serve()
		return t, nil
	}
	return &target{}, errors.New("no local address lies outside the allowlist")
}

func (t *target) serve() {
	defer close(t.done)
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		t.accepted.Add(1)
		_ = c.Close()
	}
}

// close stops listening and returns how many connections arrived.
func (t *target) close() int64 {
	if t.ln == nil {
		return 0
	}
	t.once.Do(func() {
		_ = t.ln.Close()
		<-t.done
	})
	return t.accepted.Load()
}
