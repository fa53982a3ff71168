// Package probe is the part of the isolation proof that runs inside a profile's sandbox. The
// launch binary runs it in `--probe` mode as agent-gateway-probe@<profile>.service: as that
// profile's user, under a drop-in identical to its gateway's. It tries what a hostile gateway
// would try (read a sibling's home and env file, create a file in /etc, connect outside the
// egress allowlist, hold a capability) and exits with one bit set per attempt that succeeded.
// Its only inputs are the root-owned unit and EnvironmentFile, and the agent reads its exit
// status from systemd, not from anything a gateway can write; a gateway that kills the probe
// makes the proof fail, never pass.
package probe

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Bits of the probe's exit status. Each set bit is a check that failed; 0 means every check held.
const (
	// HomeReadable: a folder the probe was told it must not list could be listed.
	HomeReadable = 1 << iota
	// FileReadable: a file the probe was told it must not read could be opened for reading.
	FileReadable
	// Writable: a file could be created in a folder that must be a read-only mount, or creating
	// it failed for another reason than the mount being read-only.
	Writable
	// Connected: a TCP connection to an address outside the allowlist reached the network: it
	// was accepted or refused by the peer, instead of being dropped by the sandbox.
	Connected
	// Capable: the process holds a capability in some set (effective, permitted, inheritable,
	// ambient or bounding).
	Capable
)

// MaxStatus is the highest exit status that carries check bits; the probe unit treats 0 to
// MaxStatus as a successful run.
const MaxStatus = 63

// ExitUsage means the probe was started without valid arguments and checked nothing.
const ExitUsage = 64

// Environment variables the probe reads its arguments from. Lists are separated by spaces.
const (
	EnvHomes    = "AGENT_PROBE_HOMES"
	EnvFiles    = "AGENT_PROBE_FILES"
	EnvReadOnly = "AGENT_PROBE_READONLY"
	EnvConnect  = "AGENT_PROBE_CONNECT"
	EnvTimeout  = "AGENT_PROBE_CONNECT_TIMEOUT_MS"
)

// Config is what one probe run tries.
type Config struct {
	// Homes are folders that must not be listable (siblings' homes).
	Homes []string
	// Files are files that must not be readable (siblings' env files).
	Files []string
	// ReadOnly are folders that must be read-only mounts (/etc).
	ReadOnly []string
	// Connect are host:port addresses outside the allowlist that must not be reachable.
	Connect []string
	// ConnectTimeout bounds each connection attempt; a dropped connection takes this long.
	ConnectTimeout time.Duration
}

// EnvFile renders the config as an EnvironmentFile. Values are restricted to characters that
// need no quoting, so the file reads back exactly.
func (c Config) EnvFile() (string, error) {
	var b strings.Builder
	b.WriteString("# Managed by the gateway-operator node agent: arguments of one isolation probe run.\n")
	for _, v := range []struct {
		name string
		list []string
	}{{EnvHomes, c.Homes}, {EnvFiles, c.Files}, {EnvReadOnly, c.ReadOnly}, {EnvConnect, c.Connect}} {
		for _, s := range v.list {
			if s == "" || strings.IndexFunc(s, func(r rune) bool { return !plain(r) }) >= 0 {
				return "", fmt.Errorf("probe argument %q: only letters, digits and /._:@[]- are allowed", s)
			}
		}
		fmt.Fprintf(&b, "%s=\"%s\"\n", v.name, strings.Join(v.list, " "))
	}
	fmt.Fprintf(&b, "%s=%d\n", EnvTimeout, c.ConnectTimeout.Milliseconds())
	return b.String(), nil
}

func plain(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._:@[]-", r)
}

// FromEnv reads a config from the environment (as os.Environ gives it).
func FromEnv(environ []string) (Config, error) {
	env := map[string]string{}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	ms, err := strconv.Atoi(env[EnvTimeout])
	if err != nil || ms <= 0 {
		return Config{}, fmt.Errorf("%s=%q: want a positive number of milliseconds", EnvTimeout, env[EnvTimeout])
	}
	c := Config{
		Homes: strings.Fields(env[EnvHomes]), Files: strings.Fields(env[EnvFiles]),
		ReadOnly: strings.Fields(env[EnvReadOnly]), Connect: strings.Fields(env[EnvConnect]),
		ConnectTimeout: time.Duration(ms) * time.Millisecond,
	}
	for _, p := range append(append(append([]string(nil), c.Homes...), c.Files...), c.ReadOnly...) {
		if !filepath.IsAbs(p) {
			return Config{}, fmt.Errorf("probe path %q is not absolute", p)
		}
	}
	if len(c.ReadOnly) == 0 {
		return Config{}, errors.New("a probe needs at least one folder that must be read-only")
	}
	return c, nil
}

// procStatus is read for the capability sets; a variable so tests can point it elsewhere.
var procStatus = "/proc/self/status"

// Run tries everything in c, writes one line per attempt to out and returns the exit status.
func Run(c Config, out io.Writer) int {
	status := 0
	report := func(bit int, failed bool, format string, args ...any) {
		verdict := "held"
		if failed {
			verdict = "FAILED"
			status |= bit
		}
		_, _ = fmt.Fprintf(out, "probe %s: %s\n", verdict, fmt.Sprintf(format, args...))
	}
	for _, h := range c.Homes {
		err := listDir(h)
		report(HomeReadable, err == nil, "list %s: %s", h, result(err))
	}
	for _, f := range c.Files {
		err := readFile(f)
		report(FileReadable, err == nil, "read %s: %s", f, result(err))
	}
	for _, d := range c.ReadOnly {
		err := create(d)
		report(Writable, !errors.Is(err, syscall.EROFS), "create a file in %s: %s (want: read-only file system)", d, result(err))
	}
	for _, a := range c.Connect {
		err := connect(a, c.ConnectTimeout)
		report(Connected, !dropped(err), "connect to %s: %s (want: dropped)", a, result(err))
	}
	caps, err := capabilities()
	report(Capable, err != nil || caps != "", "capabilities: %s", orNone(caps, err))
	return status
}

func result(err error) string {
	if err == nil {
		return "succeeded"
	}
	return err.Error()
}

func orNone(caps string, err error) string {
	switch {
	case err != nil:
		return err.Error()
	case caps == "":
		return "none"
	}
	return caps
}

// listDir opens a folder and reads one name from it.
func listDir(dir string) error {
	f, err := os.Open(dir) //nolint:gosec // the probe runs unprivileged; opening what it is told to is its job
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return nil // an empty folder that could be listed is still readable
	}
	return err
}

func readFile(file string) error {
	f, err := os.Open(file) //nolint:gosec // see listDir
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.Read(make([]byte, 1))
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// create makes a new file in dir under a random name, and removes it if that worked.
func create(dir string) error {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return err
	}
	name := filepath.Join(dir, ".agent-probe-"+hex.EncodeToString(b))
	f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600) //nolint:gosec // a fresh random name in a folder the probe is told to test
	if err != nil {
		return err
	}
	_ = f.Close()
	_ = os.Remove(name)
	return nil
}

func connect(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	return c.Close()
}

// dropped tells whether a connection attempt failed because the sandbox dropped its packets
// (EPERM from the cgroup's IP filter, or no answer at all), not because a peer answered.
func dropped(err error) bool {
	var ne net.Error
	return errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) || errors.As(err, &ne) && ne.Timeout()
}

// capabilities returns the non-empty capability sets of this process, e.g. "CapBnd=000001ff".
func capabilities() (string, error) {
	b, err := os.ReadFile(procStatus)
	if err != nil {
		return "", err
	}
	var held []string
	seen := 0
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(k, "Cap") {
			continue
		}
		seen++
		v = strings.TrimSpace(v)
		if n, err := strconv.ParseUint(v, 16, 64); err != nil || n != 0 {
			held = append(held, k+"="+v)
		}
	}
	if seen < 5 {
		return "", fmt.Errorf("%s lists %d capability sets, want 5", procStatus, seen)
	}
	return strings.Join(held, " "), nil
}
