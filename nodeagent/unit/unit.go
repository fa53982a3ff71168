// Package unit renders the files the node agent writes for systemd: the one template unit, each
// instance's hardening drop-in and each profile's environment file. Rendering is pure: the same
// settings always give the same bytes, so the agent can tell "unchanged" by comparing text and
// reload systemd only when something really changed.
package unit

import (
	"fmt"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// SharedUser runs every Convenience-mode profile.
const SharedUser = "agent"

// DefaultPython is the interpreter the launcher runs when the agent is not told otherwise.
const DefaultPython = "/usr/bin/python3"

// Variables the agent owns in every environment file (and, for the release, that the launcher
// sets from where `current` resolves). A profile's own env may not set them.
const (
	EnvRoot         = "AGENT_ROOT"
	EnvPythonPath   = "PYTHONPATH"
	EnvHome         = "AGENT_HOME"
	EnvLogs         = "AGENT_LOGS"
	EnvProfile      = "AGENT_PROFILE"
	EnvMode         = "AGENT_GATEWAY_MODE"
	EnvExec         = "AGENT_PROFILE_EXEC"
	EnvReleaseSHA   = "AGENT_RELEASE_SHA256" // set by the launcher
	EnvReleaseLabel = "AGENT_RELEASE_LABEL"  // set by the launcher
	EnvPython       = "AGENT_PYTHON"
	EnvIsolation    = "AGENT_ISOLATION"
	EnvConfigHash   = "AGENT_CONFIG_HASH"
	// EnvMaterialDigest is the digest of the Secrets and ConfigMaps the gateway starts with.
	EnvMaterialDigest = "AGENT_MATERIAL_DIGEST"
)

// Settings is everything rendered for one instance.
type Settings struct {
	Profile   layout.Profile
	Mode      v1.EntrypointMode
	Exec      string
	Isolation v1.IsolationMode
	Env       []v1.EnvVar
	Egress    []string
	// Python is the interpreter the launcher runs; DefaultPython when empty.
	Python string
	// ConfigHash, when set, is written into the env file so that a running process shows which
	// rendering it was started from.
	ConfigHash string
	// MaterialDigest, when set, is written into the env file so that a running process shows
	// which secret material it was started with. Env then holds secret values: the env file is
	// root's alone.
	MaterialDigest string
	// MemoryMax is the gateway's memory cap in bytes and TasksMax its cap on processes and
	// threads; zero means the API's default. EnvFile refuses values outside the API's bounds.
	MemoryMax int64
	TasksMax  int64
}

// The API's defaults and bounds of a gateway's resource caps, in the units systemd takes.
var (
	defaultMemoryMax = bytesOf(v1.DefaultGatewayMemoryMax)
	minMemoryMax     = bytesOf(v1.MinGatewayMemoryMax)
	maxMemoryMax     = bytesOf(v1.MaxGatewayMemoryMax)
)

func bytesOf(quantity string) int64 {
	q := resource.MustParse(quantity)
	return q.Value()
}

// limits returns the caps to render: the defaults for those left at zero.
func (s Settings) limits() (memory, tasks int64) {
	memory, tasks = s.MemoryMax, s.TasksMax
	if memory == 0 {
		memory = defaultMemoryMax
	}
	if tasks == 0 {
		tasks = v1.DefaultGatewayTasksMax
	}
	return memory, tasks
}

// checkLimits refuses caps outside the API's bounds, whatever the API server allowed: a
// MemoryMax= or TasksMax= of "infinity", 0 or 1 would not contain a gateway, or not let it run.
func (s Settings) checkLimits() error {
	memory, tasks := s.limits()
	bytes := func(n int64) string { return resource.NewQuantity(n, resource.BinarySI).String() }
	if memory < minMemoryMax || memory > maxMemoryMax {
		return fmt.Errorf("resources.memoryMax %s is outside %s to %s", bytes(memory), v1.MinGatewayMemoryMax, v1.MaxGatewayMemoryMax)
	}
	if tasks < v1.MinGatewayTasksMax || tasks > v1.MaxGatewayTasksMax {
		return fmt.Errorf("resources.tasksMax %d is outside %d to %d", tasks, v1.MinGatewayTasksMax, v1.MaxGatewayTasksMax)
	}
	return nil
}

// Template is the text of /etc/systemd/system/agent-gateway@.service. It sets no PYTHONPATH and
// no dependency on any sibling: each instance lives and restarts on its own.
func Template() string {
	return `# Managed by the gateway-operator node agent; rewritten on every apply.
# One instance per profile: agent-gateway@<profile>.service. The runtime path comes only from
# the profile's EnvironmentFile, which points through that profile's own "current" link.
[Unit]
Description=Agent gateway, profile %i
After=network-online.target
AssertPathExists=` + layout.GatewaysDir + `/%i/env

[Service]
Type=exec
EnvironmentFile=` + layout.GatewaysDir + `/%i/env
ExecStart=` + layout.LauncherPath + `
SyslogIdentifier=agent-gateway@%i
Restart=on-failure
RestartSec=2s
TimeoutStopSec=20s

[Install]
WantedBy=multi-user.target
`
}

// hardening is the Production drop-in's fixed part: every setting that costs a Python gateway
// nothing, measured to give an exposure score well under 2.0 in `systemd-analyze security`.
var hardening = []string{
	"ProtectSystem=strict",
	"ProtectHome=yes",
	"PrivateTmp=yes",
	"PrivateDevices=yes",
	"PrivateIPC=yes",
	"PrivateUsers=yes",
	"NoNewPrivileges=yes",
	"CapabilityBoundingSet=",
	"AmbientCapabilities=",
	"ProtectKernelTunables=yes",
	"ProtectKernelModules=yes",
	"ProtectKernelLogs=yes",
	"ProtectControlGroups=yes",
	"ProtectClock=yes",
	"ProtectHostname=yes",
	"ProtectProc=invisible",
	"ProcSubset=pid",
	"RestrictNamespaces=yes",
	"RestrictRealtime=yes",
	"RestrictSUIDSGID=yes",
	"LockPersonality=yes",
	"MemoryDenyWriteExecute=yes",
	"RemoveIPC=yes",
	"KeyringMode=private",
	"DevicePolicy=closed",
	"UMask=0077",
	"SystemCallArchitectures=native",
	"SystemCallFilter=@system-service",
	"SystemCallFilter=~@privileged @resources",
	"SystemCallErrorNumber=EPERM",
	"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
}

// DropIn is the text of the instance's drop-in. Both modes cap the gateway's memory (with no
// swap, so the cap is real) and tasks. Production mode runs the profile as its own user under the
// hardening above, with IP traffic denied but for the allowlist and writes allowed only to its
// home and logs. Convenience mode runs it as the shared user and hardens nothing else. The caps
// are checked by EnvFile, which the agent renders from the same Settings before writing either.
func DropIn(s Settings) string {
	var b strings.Builder
	b.WriteString("# Managed by the gateway-operator node agent; rewritten on every apply.\n[Service]\n")
	memory, tasks := s.limits()
	caps := fmt.Sprintf("MemoryMax=%d\nMemorySwapMax=0\nTasksMax=%d\n", memory, tasks)
	if s.Isolation == v1.IsolationConvenience {
		fmt.Fprintf(&b, "# Convenience isolation: every profile shares one user; state is separated by folder only.\n")
		fmt.Fprintf(&b, "User=%s\nGroup=%s\n", SharedUser, SharedUser)
		b.WriteString(caps)
		return b.String()
	}
	fmt.Fprintf(&b, "User=%s\nGroup=%s\n", s.Profile.User, s.Profile.User)
	b.WriteString(caps)
	for _, h := range hardening {
		b.WriteString(h + "\n")
	}
	b.WriteString("IPAddressDeny=any\n")
	if len(s.Egress) > 0 {
		egress := append([]string(nil), s.Egress...)
		sort.Strings(egress)
		fmt.Fprintf(&b, "IPAddressAllow=%s\n", strings.Join(egress, " "))
	}
	fmt.Fprintf(&b, "ReadWritePaths=%s %s\n", s.Profile.Home, s.Profile.Logs)
	return b.String()
}

// reserved reports whether a profile's own env may not set name.
func reserved(name string) bool {
	return strings.HasPrefix(name, "AGENT_") || strings.HasPrefix(name, "PYTHON") || strings.HasPrefix(name, "LD_")
}

// EnvFile renders the profile's EnvironmentFile. AGENT_ROOT and PYTHONPATH are declared exactly
// once, through the profile's own `current` link; the profile's env comes after the agent's
// variables and may not set any of them (checked here again, whatever the API server allowed).
// It also refuses resource caps out of bounds: it is the renderer with an error, and the agent
// runs it on the same Settings as DropIn before writing either file.
func EnvFile(s Settings) (string, error) {
	if err := s.checkLimits(); err != nil {
		return "", err
	}
	python := s.Python
	if python == "" {
		python = DefaultPython
	}
	switch s.Mode {
	case v1.EntrypointCLI:
		if s.Exec != "" {
			return "", fmt.Errorf("exec %q is set but mode is cli", s.Exec)
		}
	case v1.EntrypointScript:
		if s.Exec == "" {
			return "", fmt.Errorf("mode is script but exec is empty")
		}
	default:
		return "", fmt.Errorf("unknown entrypoint mode %q", s.Mode)
	}
	var b strings.Builder
	b.WriteString("# Managed by the gateway-operator node agent; rewritten on every apply.\n")
	put := func(k, v string) { fmt.Fprintf(&b, "%s=%s\n", k, quote(v)) }
	put(EnvRoot, s.Profile.Current)
	put(EnvPythonPath, s.Profile.Current)
	put(EnvHome, s.Profile.Home)
	put(EnvLogs, s.Profile.Logs)
	put(EnvProfile, s.Profile.Name)
	put(EnvMode, string(s.Mode))
	put(EnvExec, s.Exec)
	put(EnvPython, python)
	put(EnvIsolation, string(s.Isolation))
	// No user site-packages, whatever HOME is (the launcher also runs Python with -s).
	put("PYTHONNOUSERSITE", "1")
	if s.ConfigHash != "" {
		put(EnvConfigHash, s.ConfigHash)
	}
	if s.MaterialDigest != "" {
		put(EnvMaterialDigest, s.MaterialDigest)
	}
	seen := map[string]bool{}
	for _, e := range s.Env {
		switch {
		case reserved(e.Name):
			return "", fmt.Errorf("env %s is reserved: the agent sets the runtime path and identity itself", e.Name)
		case seen[e.Name]:
			return "", fmt.Errorf("env %s is declared twice", e.Name)
		case !validEnvName(e.Name):
			return "", fmt.Errorf("env name %q is not a valid variable name", e.Name)
		case strings.ContainsAny(e.Value, "\n\r\x00"):
			return "", fmt.Errorf("env %s: value must be one line", e.Name)
		}
		seen[e.Name] = true
		put(e.Name, e.Value)
	}
	return b.String(), nil
}

func validEnvName(n string) bool {
	if n == "" {
		return false
	}
	for i, r := range n {
		if !isNameRune(r, i > 0) {
			return false
		}
	}
	return true
}

// quote writes a value in double quotes with the escapes systemd's EnvironmentFile parser
// honors inside them, so spaces, quotes and '$' arrive literally.
func quote(v string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range v {
		if strings.ContainsRune("\"\\`$", r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}

// SetsPythonPath reports whether any setting line of a unit or drop-in mentions PYTHONPATH
// (Environment=, PassEnvironment=, an ExecStart= wrapper ...). Comments are ignored.
func SetsPythonPath(text string) bool {
	for _, line := range strings.Split(text, "\n") {
		l := strings.TrimSpace(line)
		if strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";") {
			continue
		}
		if strings.Contains(l, "PYTHONPATH") {
			return true
		}
	}
	return false
}

// isNameRune tells whether r may appear in an environment variable name: a letter or an
// underscore anywhere, a digit only after the first character.
func isNameRune(r rune, notFirst bool) bool {
	return r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || notFirst && r >= '0' && r <= '9'
}
