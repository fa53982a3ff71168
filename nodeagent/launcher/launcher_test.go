package launcher_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/launcher"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

const sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// profileTree makes a release folder and a `current` link to it, as the agent would.
func profileTree(t *testing.T) (current, release string) {
	t.Helper()
	dir := t.TempDir()
	release = filepath.Join(dir, "releases", sha+"-1.0.0")
	if err := os.MkdirAll(filepath.Join(release, "gateways"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(release, "gateways", "mcp.py"), []byte("print(1)\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	current = filepath.Join(dir, "gateways", "core", "current")
	if err := os.MkdirAll(filepath.Dir(current), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../releases/"+sha+"-1.0.0", current); err != nil {
		t.Fatal(err)
	}
	return current, release
}

func environ(current string, extra ...string) []string {
	env := []string{
		"AGENT_ROOT=" + current, "PYTHONPATH=" + current, "AGENT_HOME=/home/core", "AGENT_PROFILE=core",
		"AGENT_GATEWAY_MODE=cli", "AGENT_PROFILE_EXEC=", "AGENT_PYTHON=/usr/bin/python3", "HOME=/home/core",
	}
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		replaced := false
		for i := range env {
			if strings.HasPrefix(env[i], k+"=") {
				env[i], replaced = kv, true
			}
		}
		if !replaced {
			env = append(env, kv)
		}
	}
	return env
}

func TestResolveCLI(t *testing.T) {
	current, release := profileTree(t)
	plan, err := launcher.Resolve(environ(current), 42)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/usr/bin/python3", "-s", "-m", "agent_cli.main", "gateway", "run", "--replace"}
	if strings.Join(plan.Argv, " ") != strings.Join(want, " ") {
		t.Errorf("argv = %q, want %q", plan.Argv, want)
	}
	real, _ := filepath.EvalSymlinks(release)
	if plan.Dir != real {
		t.Errorf("dir = %s, want the release %s", plan.Dir, real)
	}
	for _, field := range []string{"pid=42", "profile=core", "mode=cli", "release=1.0.0", "sha256=" + sha,
		"cwd=" + real, "pythonpath=" + current, "runtime=" + real} {
		if !strings.Contains(plan.Banner, field) {
			t.Errorf("banner lacks %s: %s", field, plan.Banner)
		}
	}
	if strings.Contains(plan.Banner, "\n") {
		t.Errorf("banner is more than one line: %q", plan.Banner)
	}
	env := strings.Join(plan.Env, "\n") + "\n"
	for _, kv := range []string{"AGENT_RELEASE_SHA256=" + sha, "AGENT_RELEASE_LABEL=1.0.0", "PYTHONNOUSERSITE=1", "HOME=/home/core"} {
		if !strings.Contains(env, kv+"\n") {
			t.Errorf("exec environment lacks %s:\n%s", kv, env)
		}
	}
}

// TestResolveNamesTheReleaseFromCurrentOnly: the release the gateway is told it runs is the one
// `current` resolves to, whatever the environment claims; so a unit started between an env file
// write and a flip of `current` (an agent killed in between) still starts consistently.
func TestResolveNamesTheReleaseFromCurrentOnly(t *testing.T) {
	current, _ := profileTree(t)
	stale := environ(current, "AGENT_RELEASE_SHA256="+strings.Repeat("f", 64), "AGENT_RELEASE_LABEL=0.9.0", "PYTHONNOUSERSITE=0")
	plan, err := launcher.Resolve(stale, 1)
	if err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, kv := range plan.Env {
		k, _, _ := strings.Cut(kv, "=")
		count[k]++
	}
	env := strings.Join(plan.Env, "\n") + "\n"
	for _, kv := range []string{"AGENT_RELEASE_SHA256=" + sha, "AGENT_RELEASE_LABEL=1.0.0", "PYTHONNOUSERSITE=1"} {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.Contains(env, kv+"\n") || count[k] != 1 {
			t.Errorf("exec environment has %s %d times, want exactly %s:\n%s", k, count[k], kv, env)
		}
	}
}

func TestResolveScript(t *testing.T) {
	current, release := profileTree(t)
	plan, err := launcher.Resolve(environ(current, "AGENT_GATEWAY_MODE=script", "AGENT_PROFILE_EXEC=gateways/mcp.py"), 1)
	if err != nil {
		t.Fatal(err)
	}
	real, _ := filepath.EvalSymlinks(release)
	if len(plan.Argv) != 3 || plan.Argv[1] != "-s" || plan.Argv[2] != filepath.Join(real, "gateways/mcp.py") {
		t.Errorf("argv = %q", plan.Argv)
	}
}

func TestResolveRefusesBadEnvironments(t *testing.T) {
	current, _ := profileTree(t)
	for _, tc := range []struct {
		name string
		env  []string
		want string
	}{
		{"no root", without(environ(current), "AGENT_ROOT"), "AGENT_ROOT is not set"},
		{"no python", without(environ(current), "AGENT_PYTHON"), "AGENT_PYTHON is not set"},
		{"pythonpath twice", append(environ(current), "PYTHONPATH="+current), "declared 2 times"},
		{"pythonpath elsewhere", environ(current, "PYTHONPATH=/usr/lib/other"), "differs from AGENT_ROOT"},
		{"pythonpath list", environ(current, "PYTHONPATH="+current+":/tmp"), "differs from AGENT_ROOT"},
		{"not a release", environ(current, "AGENT_ROOT=/usr", "PYTHONPATH=/usr"), "not a release folder"},
		{"dangling current", environ(current, "AGENT_ROOT=/nonexistent/current", "PYTHONPATH=/nonexistent/current"), "does not resolve"},
		{"cli with exec", environ(current, "AGENT_PROFILE_EXEC=gateways/mcp.py"), "AGENT_GATEWAY_MODE is cli"},
		{"script without exec", environ(current, "AGENT_GATEWAY_MODE=script"), "AGENT_PROFILE_EXEC is empty"},
		{"script escapes", environ(current, "AGENT_GATEWAY_MODE=script", "AGENT_PROFILE_EXEC=../../../etc/passwd"), "inside the release"},
		{"script missing", environ(current, "AGENT_GATEWAY_MODE=script", "AGENT_PROFILE_EXEC=nope.py"), "no such script"},
		{"unknown mode", environ(current, "AGENT_GATEWAY_MODE=daemon"), "want cli or script"},
		{"relative python", environ(current, "AGENT_PYTHON=python3"), "absolute"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := launcher.Resolve(tc.env, 1)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Resolve error = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func without(env []string, key string) []string {
	var out []string
	for _, kv := range env {
		if !strings.HasPrefix(kv, key+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// TestLaunchBinary builds cmd/gateway-launch and runs it: a dry run prints the banner and the command
// and runs nothing; a bad environment exits with ExitConfig and one plain line, no trace.
func TestLaunchBinary(t *testing.T) {
	dir := t.TempDir()
	if err := repo.Build(dir, "gateway-launch"); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "gateway-launch")
	current, _ := profileTree(t)
	marker := filepath.Join(t.TempDir(), "ran")
	// The "interpreter" would leave a marker if it ever ran.
	fake := filepath.Join(t.TempDir(), "python")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\ntouch "+marker+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = environ(current, "AGENT_PYTHON="+fake, launcher.DryRunVar+"=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("dry run: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "agent-gateway: pid=") || !strings.HasPrefix(lines[1], "exec: \""+fake+"\" \"-s\" \"-m\" \"agent_cli.main\"") {
		t.Errorf("dry run printed:\n%s", out)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the dry run executed the interpreter")
	}

	// Without dry run it execs the interpreter, from the release folder.
	cmd = exec.Command(bin)
	cmd.Env = environ(current, "AGENT_PYTHON="+fake)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("launch: %v\n%s", err, out)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Error("the launcher did not exec the interpreter")
	}

	cmd = exec.Command(bin)
	cmd.Env = without(environ(current), "AGENT_PROFILE")
	out, err = cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != launcher.ExitConfig {
		t.Fatalf("missing env: err = %v, want exit %d", err, launcher.ExitConfig)
	}
	if got := strings.TrimSpace(string(out)); got != "launch: AGENT_PROFILE is not set: start this through agent-gateway@<profile>.service, whose EnvironmentFile sets it" {
		t.Errorf("missing env printed %q", got)
	}
}
