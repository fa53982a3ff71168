// Package launcher decides what a gateway instance runs. The `launch` binary, started by
// agent-gateway@<profile>.service with the profile's environment file, calls Resolve, prints the
// alignment banner and execs the result. Every inconsistency in the environment is an error
// with a plain message: a gateway that would import the wrong runtime must not start.
package launcher

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// Exit codes of the launch binary.
const (
	// ExitConfig means the environment is missing or contradicts itself (sysexits EX_CONFIG).
	ExitConfig = 78
	// ExitExec means the interpreter could not be executed.
	ExitExec = 126
)

// DryRunVar makes the launcher print what it would run and exit 0 without running it.
const DryRunVar = "AGENT_LAUNCH_DRYRUN"

// Plan is what the launcher will execute.
type Plan struct {
	// Argv is the full command; Argv[0] is the interpreter's absolute path.
	Argv []string
	// Env is the environment the command runs with: the unit's, with the release named by where
	// `current` resolved (AGENT_RELEASE_SHA256, AGENT_RELEASE_LABEL) and user site-packages off.
	Env []string
	// Dir is the working folder: the release tree `current` resolved to at launch.
	Dir string
	// Banner is the one alignment line printed before exec.
	Banner string
}

// Resolve reads the environment (as os.Environ gives it) and returns the plan. pid is the
// process's own PID, for the banner.
//
// The release is named by one thing only: the folder the profile's `current` link resolves to
// at launch. The environment file does not name it, so whatever order the agent writes the env
// file and flips `current` in, and wherever it is interrupted, a start of the unit by anyone
// runs a consistent gateway on the old or the new release.
func Resolve(environ []string, pid int) (*Plan, error) {
	env := map[string]string{}
	counts := map[string]int{}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
		counts[k]++
	}
	for _, k := range []string{"AGENT_ROOT", "PYTHONPATH", "AGENT_HOME", "AGENT_PROFILE", "AGENT_GATEWAY_MODE", "AGENT_PYTHON"} {
		if env[k] == "" {
			return nil, fmt.Errorf("%s is not set: start this through agent-gateway@<profile>.service, whose EnvironmentFile sets it", k)
		}
	}
	if counts["PYTHONPATH"] != 1 {
		return nil, fmt.Errorf("PYTHONPATH is declared %d times; it must be declared exactly once", counts["PYTHONPATH"])
	}
	root, pythonPath := env["AGENT_ROOT"], env["PYTHONPATH"]
	if pythonPath != root {
		return nil, fmt.Errorf("PYTHONPATH=%q differs from AGENT_ROOT=%q: the runtime must be imported from the profile's own release only", pythonPath, root)
	}
	runtime, err := filepath.EvalSymlinks(root)
	if err != nil {
		return nil, fmt.Errorf("AGENT_ROOT %s does not resolve to a release: %v", root, err)
	}
	if st, err := os.Stat(runtime); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("AGENT_ROOT %s resolves to %s, which is not a folder", root, runtime)
	}
	sha, label, ok := releaseOf(filepath.Base(runtime))
	if !ok {
		return nil, fmt.Errorf("AGENT_ROOT %s resolves to %s, which is not a release folder (<sha256>-<label>)", root, runtime)
	}
	python := env["AGENT_PYTHON"]
	if !filepath.IsAbs(python) {
		return nil, fmt.Errorf("AGENT_PYTHON=%q must be an absolute path", python)
	}

	mode := env["AGENT_GATEWAY_MODE"]
	argv, err := Argv(mode, env["AGENT_PROFILE_EXEC"], python, runtime)
	if err != nil {
		return nil, err
	}
	if mode == "script" {
		if st, err := os.Stat(argv[2]); err != nil || !st.Mode().IsRegular() {
			return nil, fmt.Errorf("AGENT_PROFILE_EXEC=%q: no such script in release %s", env["AGENT_PROFILE_EXEC"], runtime)
		}
	}

	banner := fmt.Sprintf("agent-gateway: pid=%d profile=%s mode=%s release=%s sha256=%s cwd=%s pythonpath=%s runtime=%s python=%s",
		pid, env["AGENT_PROFILE"], mode, label, sha, runtime, pythonPath, runtime, python)
	return &Plan{Argv: argv, Env: execEnv(environ, sha, label), Dir: runtime, Banner: banner}, nil
}

// execEnv is the unit's environment with the release the launcher resolved, and with Python's
// user site-packages off (the interpreter also runs with -s): a gateway imports only from its
// release and the interpreter's own library, never from a folder it can write, whatever HOME
// says.
func execEnv(environ []string, sha, label string) []string {
	set := map[string]string{"AGENT_RELEASE_SHA256": sha, "AGENT_RELEASE_LABEL": label, "PYTHONNOUSERSITE": "1"}
	out := make([]string, 0, len(environ)+len(set))
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		if _, ours := set[k]; !ours {
			out = append(out, kv)
		}
	}
	for _, k := range []string{"AGENT_RELEASE_SHA256", "AGENT_RELEASE_LABEL", "PYTHONNOUSERSITE"} {
		out = append(out, k+"="+set[k])
	}
	return out
}

// Argv is the command of an entrypoint mode ("cli", or "script" with exec, a path inside the
// release) for the release folder runtime. It checks everything but the filesystem (Resolve
// also checks that a script exists), so it also serves an off-host dry run.
func Argv(mode, exec, python, runtime string) ([]string, error) {
	switch mode {
	case "cli":
		if exec != "" {
			return nil, fmt.Errorf("AGENT_PROFILE_EXEC=%q is set but AGENT_GATEWAY_MODE is cli", exec)
		}
		return []string{python, "-s", "-m", "agent_cli.main", "gateway", "run", "--replace"}, nil
	case "script":
		if exec == "" {
			return nil, fmt.Errorf("AGENT_GATEWAY_MODE is script but AGENT_PROFILE_EXEC is empty")
		}
		clean := path.Clean(exec)
		if path.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
			return nil, fmt.Errorf("AGENT_PROFILE_EXEC=%q must be a path inside the release", exec)
		}
		return []string{python, "-s", filepath.Join(runtime, filepath.FromSlash(clean))}, nil
	}
	return nil, fmt.Errorf("AGENT_GATEWAY_MODE=%q: want cli or script", mode)
}

// releaseOf splits a release folder's name, <sha256>-<label>.
func releaseOf(base string) (sha, label string, ok bool) {
	if len(base) < 66 || base[64] != '-' {
		return "", "", false
	}
	sha, label = base[:64], base[65:]
	for _, c := range sha {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return "", "", false
		}
	}
	return sha, label, label != ""
}

// Command renders argv as one shell-quoted line, for the dry run.
func Command(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = strconv.Quote(a)
	}
	return strings.Join(q, " ")
}
