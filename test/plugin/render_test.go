package plugin_test

import (
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

// render shows a host's files for a profile as the agent's own renderers make them, with read
// access only and without the host.
func TestRenderOffHost(t *testing.T) {
	gp := profile("render", "render-r1", "render", v1.RolloutStrategy{})
	gp.Spec.Mode, gp.Spec.Exec = v1.EntrypointScript, "gateways/script.py"
	gp.Spec.EgressAllowlist = []v1.EgressRule{"10.0.0.0/8"}
	gp.Spec.Env = []v1.EnvVar{{Name: "GREETING", Value: `say "hi" $HOME`}}
	rel := release("render-r1", "1.0.0")
	mustCreate(t, host("render-1", "render"), host("render-2", "other"), rel, gp)
	ready(t, "render")

	out := gateway(t, viewer, "render", "render", "--host", "render-1")
	p, err := layout.ForProfile("render")
	if err != nil {
		t.Fatal(err)
	}
	s := unit.Settings{Profile: p, Mode: v1.EntrypointScript, Exec: "gateways/script.py", Isolation: v1.IsolationProduction,
		Env: gp.Spec.Env, Egress: []string{"10.0.0.0/8"}, Python: unit.DefaultPython}
	env, err := unit.EnvFile(s)
	if err != nil {
		t.Fatal(err)
	}
	releaseDir := layout.ReleaseDir(rel.Spec.SHA256, "1.0.0")
	for _, want := range []string{
		"from gatewayinstance/render.render-1",
		"# ---- /etc/systemd/system/agent-gateway@.service\n" + unit.Template(),
		"# ---- " + p.DropIn + "\n" + unit.DropIn(s),
		"# ---- " + p.Env + "\n" + env,
		`"/usr/bin/python3" "-s" "` + releaseDir + `/gateways/script.py"`,
		"PYTHONPATH lint: ok",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("render does not show\n%s\n---- in:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "IPAddressAllow=10.0.0.0/8") || !strings.Contains(out, "User=agent-render") {
		t.Errorf("render lacks the profile's hardening:\n%s", out)
	}

	// A host the profile does not select yet is rendered from the profile and its Release.
	out = gateway(t, viewer, "render", "render", "--host", "render-2", "--python", "/usr/local/bin/python3.12")
	if !strings.Contains(out, "it does not select render-2") || !strings.Contains(out, `"/usr/local/bin/python3.12" "-s"`) {
		t.Errorf("render of an unselected host:\n%s", out)
	}
}
