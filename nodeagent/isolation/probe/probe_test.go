package probe

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func TestConfigRoundTripsThroughTheEnvFile(t *testing.T) {
	c := Config{
		Homes: []string{"/opt/agent/gateways/api/home", "/opt/agent/gateways/web/home"}, Files: []string{"/opt/agent/gateways/api/env"},
		ReadOnly: []string{"/etc"}, Connect: []string{"127.0.0.1:4000", "[::1]:4000"}, ConnectTimeout: 750 * time.Millisecond,
	}
	text, err := c.EnvFile()
	if err != nil {
		t.Fatal(err)
	}
	var environ []string
	for _, line := range splitLines(text) {
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, _ := cut(line)
		if len(v) >= 2 && v[0] == '"' {
			v = v[1 : len(v)-1] // systemd drops the quotes
		}
		environ = append(environ, k+"="+v)
	}
	back, err := FromEnv(environ)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, c) {
		t.Errorf("read back %+v, want %+v", back, c)
	}
	for _, bad := range []Config{
		{ReadOnly: []string{"/etc"}, Homes: []string{"/a b"}},
		{ReadOnly: []string{"/etc"}, Connect: []string{`"x`}},
		{ReadOnly: []string{"$HOME"}},
	} {
		if _, err := bad.EnvFile(); err == nil {
			t.Errorf("rendered %+v", bad)
		}
	}
	for _, bad := range [][]string{
		{EnvReadOnly + "=/etc"}, // no timeout
		{EnvTimeout + "=100"},   // nothing that must be read-only
		{EnvTimeout + "=100", EnvReadOnly + "=/etc", EnvHomes + "=x"}, // a relative path
	} {
		if _, err := FromEnv(bad); err == nil {
			t.Errorf("accepted %v", bad)
		}
	}
}

func splitLines(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != '\n' {
			i++
		}
		out = append(out, s[:i])
		if i < len(s) {
			i++
		}
		s = s[i:]
	}
	return out
}

func cut(line string) (string, string, bool) {
	for i := range line {
		if line[i] == '=' {
			return line[:i], line[i+1:], true
		}
	}
	return line, "", false
}

// TestRunSetsOneBitPerHole runs the probe unsandboxed (as the test's user, root in CI), where
// every attempt it is pointed at succeeds, and with targets that must hold.
func TestRunSetsOneBitPerHole(t *testing.T) {
	dir := t.TempDir()
	home := filepath.Join(dir, "home")
	env := filepath.Join(dir, "env")
	if err := os.Mkdir(home, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(env, []byte("A=1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	// A port nobody listens on answers with a reset: the packets flowed, so that fails too.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := closed.Addr().String()
	_ = closed.Close()

	noCaps := filepath.Join(dir, "status")
	if err := os.WriteFile(noCaps, []byte("Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	someCaps := filepath.Join(dir, "status-caps")
	if err := os.WriteFile(someCaps, []byte("CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000400\nCapAmb:\t0000000000000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer func(old string) { procStatus = old }(procStatus)

	// A read-only mount that holds is shown on a real sandbox (nodeagent/isolation's tests);
	// here only folders that are not read-only are tried.
	base := Config{ConnectTimeout: time.Second}
	for _, tc := range []struct {
		name   string
		edit   func(*Config)
		status string
		want   int
	}{
		{"nothing to find", func(*Config) {}, noCaps, 0},
		{"missing sibling", func(c *Config) {
			c.Homes = []string{filepath.Join(dir, "gone")}
			c.Files = []string{filepath.Join(dir, "gone")}
		}, noCaps, 0},
		{"readable home", func(c *Config) { c.Homes = []string{home} }, noCaps, HomeReadable},
		{"readable env", func(c *Config) { c.Files = []string{env} }, noCaps, FileReadable},
		{"writable folder", func(c *Config) { c.ReadOnly = []string{dir} }, noCaps, Writable},
		{"missing folder", func(c *Config) { c.ReadOnly = []string{filepath.Join(dir, "gone")} }, noCaps, Writable},
		{"accepted connection", func(c *Config) { c.Connect = []string{ln.Addr().String()} }, noCaps, Connected},
		{"refused connection", func(c *Config) { c.Connect = []string{refused} }, noCaps, Connected},
		{"bounding set", func(*Config) {}, someCaps, Capable},
		{"unreadable status", func(*Config) {}, filepath.Join(dir, "gone"), Capable},
	} {
		c := base
		tc.edit(&c)
		procStatus = tc.status
		if got := Run(c, io.Discard); got != tc.want {
			t.Errorf("%s: status %#b, want %#b", tc.name, got, tc.want)
		}
	}
	// Nothing was left in the writable folder.
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		t.Errorf("the probe left files behind: %v", entries)
	}
}
