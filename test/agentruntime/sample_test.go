package agentruntime

import (
	"os"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// TestSampleReleaseMatchesBuild: config/samples/release.yaml names the sha256 of this
// runtime's 1.0.0 build, which the demo and the end-to-end tests place on the host. A change
// to the runtime's sources must update the sample.
func TestSampleReleaseMatchesBuild(t *testing.T) {
	b, err := os.ReadFile("../../config/samples/release.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rel v1.Release
	if err := yaml.Unmarshal(b, &rel); err != nil {
		t.Fatal(err)
	}
	tb, err := Build(Options{Version: rel.Spec.Label})
	if err != nil {
		t.Fatal(err)
	}
	if rel.Spec.SHA256 != tb.SHA256 {
		t.Errorf("config/samples/release.yaml has sha256 %s, but the %s build is %s: update the sample", rel.Spec.SHA256, rel.Spec.Label, tb.SHA256)
	}
	if !strings.HasSuffix(rel.Spec.Source.URL, "/"+SampleFile) {
		t.Errorf("sample URL %s does not end in %s", rel.Spec.Source.URL, SampleFile)
	}
}
