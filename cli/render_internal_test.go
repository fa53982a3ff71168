package cli

import (
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

func TestLintPythonPath(t *testing.T) {
	env := "AGENT_ROOT=\"/x\"\nPYTHONPATH=\"/x\"\n"
	if got := lintPythonPath("[Service]\n# PYTHONPATH is never set here\n", "[Service]\n", env); len(got) != 0 {
		t.Errorf("clean files: %v", got)
	}
	got := lintPythonPath("[Service]\nEnvironment=PYTHONPATH=/tmp\n", "[Service]\nPassEnvironment=PYTHONPATH\n", env+"PYTHONPATH=\"/y\"\n")
	if len(got) != 3 || !strings.Contains(got[2], "2 times") {
		t.Errorf("dirty files: %v", got)
	}
}

// TestRenderEnvShowsMaterialSources: a variable from a Secret shows its source, never an empty
// value; envFrom Secrets, files and the material digest are listed.
func TestRenderEnvShowsMaterialSources(t *testing.T) {
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	settings := v1.GatewaySettings{
		Env: []v1.EnvVar{{Name: "PLAIN", Value: "1"},
			{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: "gw-creds", Key: "token"}}}},
		EnvFrom: []v1.EnvFromSource{{Prefix: "APP_", SecretRef: v1.SecretReference{Name: "gw-api-keys"}}},
		Files:   []v1.FileSource{{Path: "config/key.pem", SecretKeyRef: &v1.KeySelector{Name: "gw-creds", Key: "key.pem"}}},
	}
	env, err := renderEnv(unit.FromSpec(p, settings, ""), settings, "sha256:abc")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`TOKEN="<from secret gw-creds key token>"`,
		`PLAIN="1"`,
		`AGENT_MATERIAL_DIGEST="sha256:abc"`,
		"# <every key of secret gw-api-keys, as a variable prefixed APP_>",
		"# file $AGENT_HOME/config/key.pem, mode 0600: <from secret gw-creds key key.pem>",
	} {
		if !strings.Contains(env, want) {
			t.Errorf("rendered env lacks %s:\n%s", want, env)
		}
	}
	if strings.Contains(env, `TOKEN=""`) {
		t.Errorf("a secret variable renders empty:\n%s", env)
	}
}
