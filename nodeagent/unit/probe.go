package unit

import (
	"strconv"
	"strings"

	"github.com/agent-gateway/gateway-operator/nodeagent/isolation/probe"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// ProbeTemplate is the text of /etc/systemd/system/agent-gateway-probe@.service, the agent's
// isolation probe. It runs the launcher once in probe mode and needs nothing of the gateway's:
// not its env file, not its release. Its arguments come from a root-only EnvironmentFile written
// before each run; its sandbox comes from ProbeDropIn, the same text as the gateway's drop-in.
// Every exit status that carries check bits counts as success, so a probe that found a hole
// leaves no failed unit behind; RemainAfterExit keeps the finished run loaded until the agent
// has read the bits from ExecMainStatus and stopped it.
func ProbeTemplate() string {
	statuses := make([]string, 0, probe.MaxStatus)
	for i := 1; i <= probe.MaxStatus; i++ {
		statuses = append(statuses, strconv.Itoa(i))
	}
	return `# Managed by the gateway-operator node agent; rewritten on every apply.
# Isolation probe: agent-gateway-probe@<profile>.service runs once, as that profile's user and
# under the same hardening drop-in as agent-gateway@<profile>.service, and exits with a bitmask
# of the checks that failed.
[Unit]
Description=Isolation probe of agent gateway profile %i

[Service]
Type=oneshot
RemainAfterExit=yes
EnvironmentFile=` + layout.ProbeDir + `/%i.env
ExecStart=` + layout.LauncherPath + ` --probe
SuccessExitStatus=` + strings.Join(statuses, " ") + `
TimeoutStartSec=30s
SyslogIdentifier=agent-gateway-probe@%i
`
}

// ProbeDropIn is the text of the probe's drop-in for an instance: byte for byte the gateway's
// own drop-in, so the probe runs in the sandbox the gateway runs in.
func ProbeDropIn(s Settings) string { return DropIn(s) }
