// Package chart_test lints and renders the Helm chart with the real Helm CLI and checks that it
// installs what config/ does.
package chart_test

import (
	"bytes"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/agent-gateway/gateway-operator/test/controlplane"
)

func helm(t *testing.T, args ...string) string {
	t.Helper()
	bin := os.Getenv("HELM")
	if bin == "" {
		t.Fatal("HELM is not set: run through make test, which installs the pinned Helm")
	}
	chart, err := controlplane.RepoPath("charts/gateway-operator")
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range args {
		if a == "CHART" {
			args[i] = chart
		}
	}
	var out, errOut bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String()
}

func render(t *testing.T, set ...string) []*unstructured.Unstructured {
	t.Helper()
	args := []string{"template", "gw", "CHART", "--namespace", "gateway-operator-system", "--include-crds"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	var objs []*unstructured.Unstructured
	for _, doc := range strings.Split(helm(t, args...), "\n---") {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatalf("rendered YAML: %v\n%s", err, doc)
		}
		if len(m) > 0 {
			objs = append(objs, &unstructured.Unstructured{Object: m})
		}
	}
	return objs
}

func find(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && (name == "" || o.GetName() == name) {
			return o
		}
	}
	return nil
}

func readYAML(t *testing.T, rel string) []map[string]any {
	t.Helper()
	p, err := controlplane.RepoPath(rel)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var docs []map[string]any
	for _, doc := range strings.Split(string(b), "\n---") {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
			t.Fatal(err)
		}
		if len(m) > 0 {
			docs = append(docs, m)
		}
	}
	return docs
}

func TestLint(t *testing.T) {
	helm(t, "lint", "--strict", "CHART")
}

func TestRendersWhatConfigInstalls(t *testing.T) {
	objs := render(t)
	counts := map[string]int{}
	for _, o := range objs {
		counts[o.GetKind()]++
	}
	for kind, want := range map[string]int{"CustomResourceDefinition": 5, "ServiceAccount": 2, "ClusterRole": 2,
		"ClusterRoleBinding": 2, "Deployment": 1, "DaemonSet": 1, "ValidatingAdmissionPolicy": 2, "ValidatingAdmissionPolicyBinding": 2} {
		if counts[kind] != want {
			t.Errorf("%d %s rendered, want %d", counts[kind], kind, want)
		}
	}
	// The CRDs are config/crd/bases, unchanged.
	for _, o := range objs {
		if o.GetKind() != "CustomResourceDefinition" {
			continue
		}
		want := readYAML(t, "config/crd/bases/gateway.agent.dev_"+strings.SplitN(o.GetName(), ".", 2)[0]+".yaml")[0]
		if !reflect.DeepEqual(o.Object, want) {
			t.Errorf("CRD %s differs from config/crd/bases", o.GetName())
		}
	}
	for file, name := range map[string]string{"config/rbac/role.yaml": "gateway-operator-manager", "config/rbac/agent_role.yaml": "gateway-operator-agent"} {
		want := readYAML(t, file)[0]
		got := find(objs, "ClusterRole", name)
		if got == nil || !reflect.DeepEqual(got.Object["rules"], want["rules"]) {
			t.Errorf("ClusterRole %s differs from %s", name, file)
		}
	}
	dep := find(objs, "Deployment", "gateway-operator-manager")
	ctr := dep.Object["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)
	args := strings.Join(toStrings(ctr["args"]), " ")
	for _, want := range []string{"--leader-elect", "--host-grace-period=40s", "--toolrun-runtime-class=kata"} {
		if !strings.Contains(args, want) {
			t.Errorf("manager args %q lack %s", args, want)
		}
	}
	if ctr["image"] != "ghcr.io/agent-gateway/gateway-operator:0.1.0" {
		t.Errorf("image %v", ctr["image"])
	}
}

func TestValuesTakeEffect(t *testing.T) {
	all := helm(t, "template", "gw", "CHART", "--set", "manager.hostGracePeriod=90s", "--set", "image.tag=v9",
		"--set", "agent.nodeSelector.role=gw", "--set", "toolRun.runtimeClassName=kata-qemu")
	for _, want := range []string{"--host-grace-period=90s", "gateway-operator:v9", "role: gw", "--toolrun-runtime-class=kata-qemu",
		"object.spec.runtimeClassName == 'kata-qemu'"} {
		if !strings.Contains(all, want) {
			t.Errorf("rendered chart lacks %q", want)
		}
	}
	if find(render(t, "agent.enabled=false"), "DaemonSet", "") != nil {
		t.Error("agent.enabled=false still renders the DaemonSet")
	}
	if find(render(t, "policies.enabled=false"), "ValidatingAdmissionPolicy", "") != nil {
		t.Error("policies.enabled=false still renders policies")
	}
	// Another namespace reaches the service-account identities too.
	other := helm(t, "template", "gw", "CHART", "--namespace", "gw-system")
	if !strings.Contains(other, "system:serviceaccount:gw-system:gateway-agent") || strings.Contains(other, "gateway-operator-system") {
		t.Error("the release namespace does not replace gateway-operator-system everywhere")
	}
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}
