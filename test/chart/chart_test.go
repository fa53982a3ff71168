// Package chart_test lints and renders the Helm chart charts/gateway-operator with the real Helm
// CLI and checks that it installs what config/ does, and that its values take effect.
//
// Helm is the binary named by $HELM (make test passes the pinned one from ./bin). Without it the
// pinned version is built once from the Go module proxy into
// ${XDG_CACHE_HOME:-$HOME/.cache}/gateway-operator/helm-v3.22.0/, so plain `go test` works.
package chart_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/agent-gateway/gateway-operator/test/images"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

// helmVersion must match HELM_VERSION in the Makefile.
const helmVersion = "v3.22.0"

const namespace = "gateway-operator-system"

var helmBin string

func TestMain(m *testing.M) {
	bin, err := findHelm()
	if err != nil {
		fmt.Fprintln(os.Stderr, "test/chart:", err)
		os.Exit(1)
	}
	helmBin = bin
	os.Exit(m.Run())
}

// findHelm returns $HELM, or the cached build of the pinned Helm, building it first if needed.
func findHelm() (string, error) {
	if bin := os.Getenv("HELM"); bin != "" {
		// A path, or a name looked up in PATH.
		p, err := exec.LookPath(bin)
		if err != nil {
			return "", fmt.Errorf("HELM=%s: %w", bin, err)
		}
		return filepath.Abs(p)
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "gateway-operator", "helm-"+helmVersion)
	bin := filepath.Join(dir, "helm")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("HELM is not set and there is no go command to build Helm %s with: %w", helmVersion, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Install into a scratch folder and rename, so that a concurrent or interrupted build never
	// leaves a half-written binary at the cached path.
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	fmt.Fprintf(os.Stderr, "test/chart: HELM is not set; building Helm %s into %s (once; this takes minutes)\n", helmVersion, dir)
	cmd := exec.Command(goBin, "install", "helm.sh/helm/v3/cmd/helm@"+helmVersion)
	// Outside this module, and without GOFLAGS meant for it (-mod=... breaks pkg@version).
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "GOFLAGS=", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install helm.sh/helm/v3/cmd/helm@%s: %w\n%s", helmVersion, err, out)
	}
	if err := os.Rename(filepath.Join(tmp, "helm"), bin); err != nil {
		return "", err
	}
	return bin, nil
}

func repoPath(t *testing.T, rel string) string {
	t.Helper()
	p, err := repo.Path(rel)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// runHelm runs helm with args; the word CHART stands for the chart's folder.
func runHelm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	args = slices.Clone(args)
	for i, a := range args {
		if a == "CHART" {
			args[i] = repoPath(t, "charts/gateway-operator")
		}
	}
	var out, errOut bytes.Buffer
	cmd := exec.Command(helmBin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("helm %s: %w\n%s%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), nil
}

func helm(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runHelm(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

type object = map[string]any

// decode splits a multi-document YAML stream and decodes every non-empty document.
func decode(t *testing.T, what string, r io.Reader) []object {
	t.Helper()
	var objs []object
	yr := utilyaml.NewYAMLReader(bufio.NewReader(r))
	for {
		doc, err := yr.Read()
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		var o object
		if err := yaml.Unmarshal(doc, &o); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, doc)
		}
		if len(o) > 0 {
			objs = append(objs, o)
		}
	}
}

func readConfig(t *testing.T, rel string) []object {
	t.Helper()
	f, err := os.Open(repoPath(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return decode(t, rel, f)
}

// render runs helm template for the release gw with --set values and decodes the output.
func render(t *testing.T, ns string, set ...string) []object {
	t.Helper()
	args := []string{"template", "gw", "CHART", "--namespace", ns, "--include-crds"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return decode(t, "helm template", strings.NewReader(helm(t, args...)))
}

// get walks nested maps and lists: a string key indexes a map, an int a list. It returns nil
// when the path does not exist.
func get(o any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := o.(map[string]any)
			if !ok {
				return nil
			}
			o = m[k]
		case int:
			l, ok := o.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			o = l[k]
		}
	}
	return o
}

func str(o any, path ...any) string {
	s, _ := get(o, path...).(string)
	return s
}

func find(objs []object, kind, name string) object {
	for _, o := range objs {
		if str(o, "kind") == kind && str(o, "metadata", "name") == name {
			return o
		}
	}
	return nil
}

// findIn is find for namespaced objects: the chart installs Roles of one name into two namespaces
// (the release's and kube-system).
func findIn(objs []object, kind, namespace, name string) object {
	for _, o := range objs {
		if str(o, "kind") == kind && str(o, "metadata", "namespace") == namespace && str(o, "metadata", "name") == name {
			return o
		}
	}
	return nil
}

func ofKind(objs []object, kind string) []object {
	var out []object
	for _, o := range objs {
		if str(o, "kind") == kind {
			out = append(out, o)
		}
	}
	return out
}

func container(t *testing.T, objs []object, kind, name string) map[string]any {
	t.Helper()
	o := find(objs, kind, name)
	if o == nil {
		t.Fatalf("no %s %s rendered", kind, name)
	}
	c, ok := get(o, "spec", "template", "spec", "containers", 0).(map[string]any)
	if !ok {
		t.Fatalf("%s %s has no container", kind, name)
	}
	return c
}

func args(c map[string]any) []string {
	var out []string
	for _, a := range get(c, "args").([]any) {
		out = append(out, a.(string))
	}
	return out
}

// helmLabels are the labels the chart adds to every object it templates.
var helmLabels = map[string]string{
	"app.kubernetes.io/name":       "gateway-operator",
	"app.kubernetes.io/instance":   "gw",
	"app.kubernetes.io/version":    "0.1.0",
	"app.kubernetes.io/managed-by": "Helm",
	"app.kubernetes.io/part-of":    "gateway-operator",
	"helm.sh/chart":                "gateway-operator-0.1.0",
}

func TestLint(t *testing.T) {
	helm(t, "lint", "--strict", "CHART")
	helm(t, "lint", "--strict", "CHART", "--namespace", "gw-system", "--set", "agent.enabled=false", "--set", "policies.enabled=false")
}

// crds/ is installed by Helm untemplated, so it must be config/crd/bases byte for byte.
func TestCRDsAreConfigCopies(t *testing.T) {
	want, err := filepath.Glob(filepath.Join(repoPath(t, "config/crd/bases"), "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := filepath.Glob(filepath.Join(repoPath(t, "charts/gateway-operator/crds"), "*"))
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 5 {
		t.Errorf("config/crd/bases holds %d CRDs, want 5", len(want))
	}
	names := func(ps []string) (out []string) {
		for _, p := range ps {
			out = append(out, filepath.Base(p))
		}
		return out
	}
	if !slices.Equal(names(got), names(want)) {
		t.Fatalf("chart crds/ holds %v, config/crd/bases %v; run make manifests", names(got), names(want))
	}
	for _, p := range want {
		a, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(repoPath(t, "charts/gateway-operator/crds"), filepath.Base(p)))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("charts/gateway-operator/crds/%s differs from config/crd/bases; run make manifests", filepath.Base(p))
		}
	}
}

// normalize turns a rendered object into its config/ form: it drops the labels the chart adds
// (those config/ does not set), the image (config/ says :latest, the chart its appVersion) and
// imagePullPolicy, and the manager flags that config/ leaves at their defaults.
func normalize(got, want object) object {
	var c object
	b, _ := yaml.Marshal(got)
	_ = yaml.Unmarshal(b, &c)
	if labels, ok := get(c, "metadata", "labels").(map[string]any); ok {
		for k := range helmLabels {
			if get(want, "metadata", "labels", k) == nil {
				delete(labels, k)
			}
		}
		if len(labels) == 0 {
			delete(get(c, "metadata").(map[string]any), "labels")
		}
	}
	if cs, ok := get(c, "spec", "template", "spec", "containers").([]any); ok {
		for _, x := range cs {
			ctr := x.(map[string]any)
			ctr["image"] = ""
			delete(ctr, "imagePullPolicy")
			if a, ok := ctr["args"].([]any); ok {
				ctr["args"] = slices.DeleteFunc(a, func(v any) bool {
					return v == "--toolrun-runtime-class=kata" || v == "--toolrun-ttl=1h"
				})
			}
		}
	}
	if cs, ok := get(want, "spec", "template", "spec", "containers").([]any); ok {
		for _, x := range cs {
			x.(map[string]any)["image"] = ""
		}
	}
	return c
}

// configFiles lists the manifests `kubectl apply -k config/default` applies, read from the
// kustomizations, so that a manifest added to config/ is missed by the chart only loudly.
func configFiles(t *testing.T) []string {
	t.Helper()
	type kustomization struct {
		Resources []string `json:"resources"`
	}
	read := func(dir string) []string {
		b, err := os.ReadFile(repoPath(t, filepath.Join(dir, "kustomization.yaml")))
		if err != nil {
			t.Fatal(err)
		}
		var k kustomization
		if err := yaml.Unmarshal(b, &k); err != nil {
			t.Fatalf("%s/kustomization.yaml: %v", dir, err)
		}
		var out []string
		for _, r := range k.Resources {
			out = append(out, filepath.Clean(filepath.Join(dir, r)))
		}
		return out
	}
	var files []string
	for _, dir := range read("config/default") {
		files = append(files, read(dir)...)
	}
	return files
}

// TestRendersWhatConfigInstalls renders the chart with its defaults and compares every object
// with the object of the same kind and name in config/.
func TestRendersWhatConfigInstalls(t *testing.T) {
	objs := render(t, namespace)

	counts := map[string]int{}
	for _, o := range objs {
		counts[str(o, "kind")]++
	}
	for kind, want := range map[string]int{"CustomResourceDefinition": 5, "ServiceAccount": 2, "ClusterRole": 2,
		"ClusterRoleBinding": 2, "Deployment": 1, "DaemonSet": 1, "ValidatingAdmissionPolicy": 1, "ValidatingAdmissionPolicyBinding": 1} {
		if counts[kind] < want {
			t.Errorf("%d %s rendered, want at least %d", counts[kind], kind, want)
		}
	}
	if counts["Namespace"] != 0 {
		t.Error("the chart renders a Namespace; it installs into the release namespace")
	}

	var config []object
	files := configFiles(t)
	if len(files) < 10 {
		t.Fatalf("config/default applies only %v", files)
	}
	for _, f := range files {
		for _, want := range readConfig(t, f) {
			kind, name := str(want, "kind"), str(want, "metadata", "name")
			if kind == "Namespace" {
				continue // the release namespace, made by helm --create-namespace
			}
			got := findIn(objs, kind, str(want, "metadata", "namespace"), name)
			if got == nil {
				t.Errorf("%s %s of %s is not in the chart", kind, name, f)
				continue
			}
			if n := normalize(got, want); !reflect.DeepEqual(n, want) {
				a, _ := yaml.Marshal(n)
				b, _ := yaml.Marshal(want)
				t.Errorf("%s %s differs from %s:\nchart:\n%s\nconfig:\n%s", kind, name, f, a, b)
			}
			config = append(config, want)
		}
	}
	for _, o := range objs {
		if findIn(config, str(o, "kind"), str(o, "metadata", "namespace"), str(o, "metadata", "name")) == nil {
			t.Errorf("the chart renders %s %s, which config/ does not install", str(o, "kind"), str(o, "metadata", "name"))
		}
	}

	for _, o := range objs {
		if str(o, "kind") == "CustomResourceDefinition" {
			continue
		}
		for k, v := range helmLabels {
			if got := str(o, "metadata", "labels", k); got != v {
				t.Errorf("%s %s: label %s=%q, want %q", str(o, "kind"), str(o, "metadata", "name"), k, got, v)
			}
		}
	}

	mgr := container(t, objs, "Deployment", "gateway-operator-manager")
	for _, want := range []string{"--leader-elect", "--host-grace-period=40s", "--toolrun-runtime-class=kata"} {
		if !slices.Contains(args(mgr), want) {
			t.Errorf("manager args %q lack %s", args(mgr), want)
		}
	}
	agent := container(t, objs, "DaemonSet", "gateway-agent")
	names, err := images.Load()
	if err != nil {
		t.Fatal(err)
	}
	for c, want := range map[string]string{"manager": names.ManagerRef(), "agent": names.AgentRef()} {
		ctr := map[string]map[string]any{"manager": mgr, "agent": agent}[c]
		if ctr["image"] != want {
			t.Errorf("container %s: image %v, want %s (config/images.env)", c, ctr["image"], want)
		}
	}
	if r := get(find(objs, "Deployment", "gateway-operator-manager"), "spec", "replicas"); r != float64(2) {
		t.Errorf("manager replicas %v, want 2", r)
	}
}

// The ClusterRoles are compared on their own too: they are what the operator may do.
func TestClusterRolesAreConfigs(t *testing.T) {
	objs := render(t, namespace)
	for _, role := range [][2]string{
		{"config/rbac/role.yaml", "gateway-operator-manager"},
		{"config/rbac/agent_role.yaml", "gateway-operator-agent"},
		{"config/rbac/user_roles.yaml", "gateway-operator-viewer"},
		{"config/rbac/user_roles.yaml", "gateway-operator-operator"},
	} {
		file, name := role[0], role[1]
		want := find(readConfig(t, file), "ClusterRole", name)
		if want == nil {
			t.Fatalf("%s has no ClusterRole %s", file, name)
		}
		got := find(objs, "ClusterRole", name)
		if got == nil {
			t.Fatalf("no ClusterRole %s rendered", name)
		}
		if !reflect.DeepEqual(got["rules"], want["rules"]) {
			t.Errorf("ClusterRole %s rules differ from %s:\nchart:  %v\nconfig: %v", name, file, got["rules"], want["rules"])
		}
	}
}

func TestValuesTakeEffect(t *testing.T) {
	objs := render(t, namespace, "manager.hostGracePeriod=90s", "image.tag=v9", "agent.nodeSelector.role=gw",
		"toolRun.runtimeClassName=kata-qemu", "toolRun.ttl=2h", "manager.replicas=3", "image.pullPolicy=Always")

	mgr := container(t, objs, "Deployment", "gateway-operator-manager")
	for _, want := range []string{"--host-grace-period=90s", "--toolrun-runtime-class=kata-qemu", "--toolrun-ttl=2h"} {
		if !slices.Contains(args(mgr), want) {
			t.Errorf("manager args %q lack %s", args(mgr), want)
		}
	}
	if r := get(find(objs, "Deployment", "gateway-operator-manager"), "spec", "replicas"); r != float64(3) {
		t.Errorf("manager replicas %v, want 3", r)
	}
	agent := container(t, objs, "DaemonSet", "gateway-agent")
	for _, c := range []map[string]any{mgr, agent} {
		if !strings.HasSuffix(str(c, "image"), "-"+str(c, "name")+":v9") || c["imagePullPolicy"] != "Always" {
			t.Errorf("container %s: image %v pull policy %v, want tag v9 and Always", c["name"], c["image"], c["imagePullPolicy"])
		}
	}
	sel := get(find(objs, "DaemonSet", "gateway-agent"), "spec", "template", "spec", "nodeSelector")
	if want := map[string]any{"gateway.agent.dev/host": "true", "role": "gw"}; !reflect.DeepEqual(sel, want) {
		t.Errorf("agent nodeSelector %v, want %v", sel, want)
	}
	// The tool-run policy demands the RuntimeClass the manager uses, and no longer kata.
	rule := get(find(objs, "ValidatingAdmissionPolicy", "gateway-toolrun-pods"), "spec", "validations", 0)
	if e := str(rule, "expression"); !strings.Contains(e, "runtimeClassName == 'kata-qemu'") {
		t.Errorf("tool-run policy's RuntimeClass rule is %q, want it to demand kata-qemu", e)
	}
	if m := str(rule, "messageExpression"); !strings.Contains(m, "must be kata-qemu") {
		t.Errorf("tool-run policy's RuntimeClass message is %q, want it to name kata-qemu", m)
	}

	if objs := render(t, namespace, "agent.enabled=false"); len(ofKind(objs, "DaemonSet")) != 0 {
		t.Error("agent.enabled=false still renders the DaemonSet")
	} else if find(objs, "ServiceAccount", "gateway-agent") == nil || find(objs, "ClusterRole", "gateway-operator-agent") == nil {
		t.Error("agent.enabled=false drops the agent's identity, which bare-metal agents need too")
	}
	objs = render(t, namespace, "policies.enabled=false")
	if n := len(ofKind(objs, "ValidatingAdmissionPolicy")) + len(ofKind(objs, "ValidatingAdmissionPolicyBinding")); n != 0 {
		t.Errorf("policies.enabled=false still renders %d policy objects", n)
	}
	if find(objs, "Deployment", "gateway-operator-manager") == nil {
		t.Error("policies.enabled=false drops the manager")
	}
	// Without gateway-manager-agent-access the manager may not write Roles or RoleBindings.
	for _, on := range []bool{true, false} {
		objs := objs
		if on {
			objs = render(t, namespace)
		}
		var verbs []string
		for _, rule := range get(findIn(objs, "Role", namespace, "gateway-operator-manager"), "rules").([]any) {
			if slices.Contains(get(rule, "resources").([]any), any("roles")) {
				for _, v := range get(rule, "verbs").([]any) {
					verbs = append(verbs, v.(string))
				}
			}
		}
		if writes := slices.Contains(verbs, "create") || slices.Contains(verbs, "update") || slices.Contains(verbs, "delete"); writes != on {
			t.Errorf("policies.enabled=%v: the manager's Role may %v Roles; want writes only with the policies", on, verbs)
		}
	}
	if sel := get(find(render(t, namespace, "agent.nodeSelector=null"), "DaemonSet", "gateway-agent"), "spec", "template", "spec", "nodeSelector"); sel != nil {
		t.Errorf("an empty agent.nodeSelector renders nodeSelector %v, want none (every node)", sel)
	}
}

// TestReleaseNamespace: installed into another namespace, every namespaced object, every service-account subject and
// the service-account users of the agent and manager policies follow the release namespace.
func TestReleaseNamespace(t *testing.T) {
	out := helm(t, "template", "gw", "CHART", "--namespace", "gw-system")
	if strings.Contains(out, namespace) {
		t.Errorf("rendered into gw-system, the chart still names %s", namespace)
	}
	objs := decode(t, "helm template", strings.NewReader(out))
	for _, kind := range []string{"ServiceAccount", "Deployment", "DaemonSet"} {
		for _, o := range ofKind(objs, kind) {
			if ns := str(o, "metadata", "namespace"); ns != "gw-system" {
				t.Errorf("%s %s in namespace %q, want gw-system", kind, str(o, "metadata", "name"), ns)
			}
		}
	}
	for _, b := range ofKind(objs, "ClusterRoleBinding") {
		for _, s := range get(b, "subjects").([]any) {
			if str(s, "kind") == "ServiceAccount" && str(s, "namespace") != "gw-system" {
				t.Errorf("ClusterRoleBinding %s binds %s/%s, want gw-system", str(b, "metadata", "name"), str(s, "namespace"), str(s, "name"))
			}
		}
	}
	match := str(find(objs, "ValidatingAdmissionPolicy", "gateway-agent-own-host"), "spec", "matchConditions", 0, "expression")
	if !strings.Contains(match, "'system:serviceaccount:gw-system:gateway-agent'") {
		t.Errorf("agent policy does not match the gw-system agent service account: %s", match)
	}
	match = str(find(objs, "ValidatingAdmissionPolicy", "gateway-manager-toolrun-objects"), "spec", "matchConditions", 0, "expression")
	if !strings.Contains(match, "'system:serviceaccount:gw-system:gateway-operator-manager'") {
		t.Errorf("manager policy does not match the gw-system manager service account: %s", match)
	}
}

// values.schema.json and the templates refuse values the binaries or the API server would
// only reject later, at start-up or at the first tool run.
func TestRejectsBadValues(t *testing.T) {
	for _, set := range []string{
		"manager.hostGracePeriod=40",             // not a Go duration
		"toolRun.ttl=1 hour",                     // not a Go duration
		"toolRun.runtimeClassName=Kata'",         // pasted into a CEL string literal
		"manager.replica=3",                      // misspelled key
		"image.pullPolicy=Sometimes",             // not a pull policy
		"agent.nodeSelector.gateway\\.io/x=true", // nodeSelector values must be strings
	} {
		if _, err := runHelm(t, "template", "gw", "CHART", "--namespace", namespace, "--set", set); err == nil {
			t.Errorf("--set %s renders; want it refused", set)
		}
	}
}
