package unit

import (
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

func TestFromSpec(t *testing.T) {
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	s := FromSpec(p, v1.GatewaySettings{EgressAllowlist: []v1.EgressRule{"10.0.0.1"}}, "")
	if s.Mode != v1.EntrypointCLI || s.Isolation != v1.IsolationProduction || len(s.Egress) != 1 || s.MemoryMax != 0 {
		t.Errorf("defaults: %+v", s)
	}
	if _, err := EnvFile(s); err != nil {
		t.Errorf("EnvFile of the defaults: %v", err)
	}
	huge := resource.MustParse("100Ei")
	s = FromSpec(p, v1.GatewaySettings{Resources: v1.GatewayResources{MemoryMax: &huge, TasksMax: 64}}, "/usr/bin/python3.12")
	if s.TasksMax != 64 || s.Python != "/usr/bin/python3.12" {
		t.Errorf("settings: %+v", s)
	}
	if _, err := EnvFile(s); err == nil {
		t.Error("EnvFile accepted a memory cap beyond int64")
	}
}
