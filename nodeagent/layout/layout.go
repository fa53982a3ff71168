// Package layout names every file and folder the node agent owns on a host. All paths exist in
// two forms: the path inside the host (what units and the launcher see, e.g.
// /opt/agent/gateways/core/env) and the same path under the agent's root prefix (what the agent
// opens; the prefix is "/" on a real host and a sandbox's root folder in tests).
package layout

import (
	"fmt"
	"path"
	"path/filepath"
	"strings"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Paths inside a host.
const (
	AgentDir     = "/opt/agent"
	ReleasesDir  = AgentDir + "/releases"
	GatewaysDir  = AgentDir + "/gateways"
	LauncherPath = AgentDir + "/_lib/launch"
	UnitDir      = "/etc/systemd/system"
	// TemplateUnit is the one template every profile is an instance of.
	TemplateUnit = "agent-gateway@.service"
	// BareUnit is the instance-less name; the agent masks it so it can never run.
	BareUnit = "agent-gateway.service"
	// UnitPattern matches every instance, for listing siblings.
	UnitPattern = "agent-gateway@*.service"
	// DropInName is the agent's drop-in file inside an instance's .d folder.
	DropInName = "50-gateway-operator.conf"
	// UsersRegistry lists the system users the agent created (root's, mode 0600); the agent uses
	// no other account.
	UsersRegistry = AgentDir + "/users.json"
)

// Host resolves host paths under a root prefix.
type Host struct {
	// Root is the prefix under which the host's filesystem is reached: "/" on a real host.
	Root string
	// HostTools runs the host's own systemd-analyze and useradd chrooted into Root instead of
	// the agent's (see Command): what the agent's container image, which carries neither, needs.
	HostTools bool
}

// On returns the path under the root prefix of a path inside the host.
func (h Host) On(hostPath string) string {
	return filepath.Join(h.Root, filepath.FromSlash(hostPath))
}

// Unit is the systemd unit name of a profile's instance.
func Unit(profile string) string { return "agent-gateway@" + profile + ".service" }

// ReleaseDir is a staged release's folder inside the host.
func ReleaseDir(sha256, label string) string {
	return path.Join(ReleasesDir, sha256+"-"+label)
}

// Profile holds the paths of one profile inside the host. Build it with ForProfile, which
// validates the name first.
type Profile struct {
	Name    string
	Dir     string // /opt/agent/gateways/<p>
	Current string // <Dir>/current, the link to this profile's release
	Env     string // <Dir>/env, the EnvironmentFile
	// Material records the files the agent last wrote into home from Secrets and ConfigMaps,
	// with their content: root's, 0600, the copy a rollback restores.
	Material string // <Dir>/material.json
	Home     string // <Dir>/home, AGENT_HOME
	Logs     string // <Dir>/logs
	// StatusSocket is where the gateway serves its status endpoint.
	StatusSocket string
	Unit         string // agent-gateway@<p>.service
	DropInDir    string // /etc/systemd/system/agent-gateway@<p>.service.d
	DropIn       string // <DropInDir>/50-gateway-operator.conf
	User         string // agent-<p>, the Production-isolation user
}

// ForProfile returns the paths of a profile, refusing a name that is not a valid profile name:
// the name becomes a folder, a unit instance and a user name.
func ForProfile(name string) (Profile, error) {
	if err := v1.ValidateProfileName(name); err != nil {
		return Profile{}, fmt.Errorf("refusing profile: %w", err)
	}
	dir := path.Join(GatewaysDir, name)
	unit := Unit(name)
	return Profile{
		Name:         name,
		Dir:          dir,
		Current:      path.Join(dir, "current"),
		Env:          path.Join(dir, "env"),
		Material:     path.Join(dir, "material.json"),
		Home:         path.Join(dir, "home"),
		Logs:         path.Join(dir, "logs"),
		StatusSocket: path.Join(dir, "home", "run", "status.sock"),
		Unit:         unit,
		DropInDir:    path.Join(UnitDir, unit+".d"),
		DropIn:       path.Join(UnitDir, unit+".d", DropInName),
		User:         v1.ProfileUserPrefix + name,
	}, nil
}

// ProfileOfUser returns the profile that runs as user under Production isolation: p for
// agent-<p> when p is a valid profile name. A reserved name is not a valid profile name, so the
// agent's own agent-microvm belongs to no profile.
func ProfileOfUser(user string) (string, bool) {
	p, ok := strings.CutPrefix(user, v1.ProfileUserPrefix)
	return p, ok && v1.ValidateProfileName(p) == nil
}

// The isolation probe: a second template whose instance runs once, as a profile's user, under a
// drop-in identical to that profile's gateway drop-in (see nodeagent/isolation).
const (
	// ProbeTemplateUnit is the probe's template unit.
	ProbeTemplateUnit = "agent-gateway-probe@.service"
	// ProbeDir holds each probe run's arguments, <profile>.env, readable by root only.
	ProbeDir = AgentDir + "/probe"
)

// ProbeUnit is the systemd unit name of a profile's isolation probe.
func ProbeUnit(profile string) string { return "agent-gateway-probe@" + profile + ".service" }

// ProbeEnv is the EnvironmentFile of a profile's isolation probe.
func ProbeEnv(profile string) string { return path.Join(ProbeDir, profile+".env") }

// ProbeDropIn is the drop-in of a profile's isolation probe: the same text as the gateway's.
func ProbeDropIn(profile string) string {
	return path.Join(UnitDir, ProbeUnit(profile)+".d", DropInName)
}
