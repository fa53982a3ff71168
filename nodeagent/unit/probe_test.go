package unit

import (
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/isolation/probe"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// TestProbeRunsInTheGatewaySandboxWithoutItsEnvFile: the probe's drop-in is the gateway's, byte
// for byte, and its template reads nothing of the gateway's (no env file, no release).
func TestProbeRunsInTheGatewaySandboxWithoutItsEnvFile(t *testing.T) {
	s := settings(t)
	s.Egress = []string{"10.0.0.0/8"}
	if ProbeDropIn(s) != DropIn(s) {
		t.Errorf("probe drop-in differs from the gateway's:\n%s\n---\n%s", ProbeDropIn(s), DropIn(s))
	}
	tmpl := ProbeTemplate()
	for _, want := range []string{
		"Type=oneshot\n", "RemainAfterExit=yes\n",
		"EnvironmentFile=" + layout.ProbeDir + "/%i.env\n",
		"ExecStart=" + layout.LauncherPath + " --probe\n",
	} {
		if !strings.Contains(tmpl, want) {
			t.Errorf("probe template lacks %q:\n%s", want, tmpl)
		}
	}
	if strings.Contains(tmpl, layout.GatewaysDir) || count(tmpl, "EnvironmentFile") != 1 {
		t.Errorf("probe template reads something of the gateway's:\n%s", tmpl)
	}
	// Every status that carries check bits is a successful run; ExitUsage is not.
	var statuses []string
	for _, line := range strings.Split(tmpl, "\n") {
		if v, ok := strings.CutPrefix(line, "SuccessExitStatus="); ok {
			statuses = strings.Fields(v)
		}
	}
	if len(statuses) != probe.MaxStatus || statuses[0] != "1" || statuses[len(statuses)-1] != "63" {
		t.Errorf("SuccessExitStatus lists %v", statuses)
	}
}
