package v1alpha1_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

// These tests run against a real kube-apiserver and etcd with the generated CRDs installed:
// the schema, not the Go code, is what rejects bad input here.

var cp *controlplane.Env

func TestMain(m *testing.M) {
	var err error
	cp, err = controlplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if err := cp.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop control plane:", err)
		code = 1
	}
	os.Exit(code)
}

const sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func release(name string) *v1.Release {
	return &v1.Release{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.ReleaseSpec{
			Source: v1.ReleaseSource{URL: "https://releases.example.com/agent-1.0.0.tar.gz"},
			SHA256: sha,
			Label:  "1.0.0",
		},
	}
}

func profile(name string) *v1.GatewayProfile {
	return &v1.GatewayProfile{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1.GatewayProfileSpec{Release: "r1"},
	}
}

// mustReject asserts that the API server refuses obj as invalid, with a message containing
// every one of wants.
func mustReject(t *testing.T, obj client.Object, wants ...string) {
	t.Helper()
	err := cp.Client.Create(context.Background(), obj)
	if err == nil {
		_ = cp.Client.Delete(context.Background(), obj)
		t.Fatalf("created %T %q; want it rejected (%s)", obj, obj.GetName(), strings.Join(wants, ", "))
	}
	if !apierrors.IsInvalid(err) {
		t.Fatalf("create %q: want an Invalid error, got %v", obj.GetName(), err)
	}
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("create %q: error %q does not mention %q", obj.GetName(), err, w)
		}
	}
}

func mustCreate(t *testing.T, obj client.Object) {
	t.Helper()
	if err := cp.Client.Create(context.Background(), obj); err != nil {
		t.Fatalf("create %T %q: %v", obj, obj.GetName(), err)
	}
	t.Cleanup(func() { _ = cp.Client.Delete(context.Background(), obj) })
}

func TestCRDsInstalled(t *testing.T) {
	ctx := context.Background()
	lists := map[string]client.ObjectList{
		"gatewayhosts": &v1.GatewayHostList{}, "releases": &v1.ReleaseList{},
		"gatewayprofiles": &v1.GatewayProfileList{}, "gatewayinstances": &v1.GatewayInstanceList{},
		"toolruns": &v1.ToolRunList{},
	}
	for name, list := range lists {
		if err := cp.Client.List(ctx, list); err != nil {
			t.Errorf("list %s: %v", name, err)
		}
	}
	// Short names and categories are what people type.
	out := kubectl(t, "api-resources", "--api-group=gateway.agent.dev", "--no-headers")
	for _, short := range []string{"gwh", "grel", "gwp", "gwi", "trun"} {
		if !strings.Contains(out, " "+short+" ") {
			t.Errorf("kubectl api-resources does not list short name %s:\n%s", short, out)
		}
	}
}

func TestProfileNameValidation(t *testing.T) {
	mustCreate(t, profile("core"))
	mustCreate(t, profile(strings.Repeat("a", 26)))
	mustCreate(t, profile("microvm2"))
	for _, tc := range []struct{ name, why string }{
		{"../etc", "metadata.name"},
		{"Core", "metadata.name"},
		{strings.Repeat("a", 63), "metadata.name: a profile name must be at most 26 characters"},
		{strings.Repeat("a", 27), "metadata.name: a profile name must be at most 26 characters"},
		{"1core", "metadata.name: a profile name must be a DNS label"},
		{"core-", "metadata.name"},
		// agent-microvm is the node agent's QEMU user.
		{"microvm", "metadata.name: a profile name must not be a reserved name"},
	} {
		t.Run(tc.name, func(t *testing.T) { mustReject(t, profile(tc.name), tc.why) })
	}
}

func TestHostNameValidation(t *testing.T) {
	mustCreate(t, &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}})
	mustReject(t, &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: "node.example.com"}}, "metadata.name: a host name must be a DNS label")
	mustReject(t, &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: strings.Repeat("h", 64)}}, "metadata.name")
}

// TestHostAccelerationValidation: the microVM acceleration a host reports is KVM or TCG, and
// its reason is one bounded sentence.
func TestHostAccelerationValidation(t *testing.T) {
	ctx := context.Background()
	gh := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: "node-accel"}}
	mustCreate(t, gh)
	write := func(accel v1.MicroVMAcceleration, reason string) error {
		var got v1.GatewayHost
		if err := cp.Client.Get(ctx, client.ObjectKeyFromObject(gh), &got); err != nil {
			t.Fatal(err)
		}
		got.Status.Capabilities = v1.HostCapabilities{MicroVM: true, MicroVMAcceleration: accel, MicroVMAccelerationReason: reason}
		return cp.Client.Status().Update(ctx, &got)
	}
	if err := write(v1.AccelerationTCG, strings.Repeat("r", v1.MaxAccelerationReasonLength)); err != nil {
		t.Fatalf("TCG with a reason of the longest length: %v", err)
	}
	if err := write(v1.AccelerationKVM, "a probe VM booted under KVM"); err != nil {
		t.Fatalf("KVM: %v", err)
	}
	for _, tc := range []struct {
		accel  v1.MicroVMAcceleration
		reason string
		want   string
	}{
		{"kvm", "", "microVMAcceleration"},
		{"HVF", "", "microVMAcceleration"},
		{v1.AccelerationTCG, strings.Repeat("r", v1.MaxAccelerationReasonLength+1), "microVMAccelerationReason"},
	} {
		err := write(tc.accel, tc.reason)
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q with a %d-byte reason: %v, want Invalid about %s", tc.accel, len(tc.reason), err, tc.want)
		}
	}
}

func TestReleaseIsImmutable(t *testing.T) {
	ctx := context.Background()
	r := release("agent-1-0-0")
	mustCreate(t, r)
	r.Spec.SHA256 = strings.Repeat("f", 64)
	err := cp.Client.Update(ctx, r)
	if err == nil || !strings.Contains(err.Error(), "spec is immutable") {
		t.Fatalf("changing a Release's sha256: want 'spec is immutable', got %v", err)
	}
	var got v1.Release
	if err := cp.Client.Get(ctx, client.ObjectKeyFromObject(r), &got); err != nil {
		t.Fatal(err)
	}
	if got.Spec.SHA256 != sha {
		t.Errorf("stored sha256 changed to %s", got.Spec.SHA256)
	}
	// Labels and annotations are not part of the build and may change.
	got.Labels = map[string]string{"channel": "stable"}
	if err := cp.Client.Update(ctx, &got); err != nil {
		t.Errorf("relabelling a Release: %v", err)
	}
}

func TestReleaseSpecValidation(t *testing.T) {
	bad := func(mut func(*v1.Release)) *v1.Release {
		r := release("bad")
		mut(r)
		return r
	}
	mustReject(t, bad(func(r *v1.Release) { r.Spec.SHA256 = strings.ToUpper(sha) }), "spec.sha256")
	mustReject(t, bad(func(r *v1.Release) { r.Spec.SHA256 = sha[:63] }), "spec.sha256")
	mustReject(t, bad(func(r *v1.Release) { r.Spec.Source.URL = "ftp://example.com/a.tgz" }), "spec.source.url")
	mustReject(t, bad(func(r *v1.Release) { r.Spec.Label = "../x" }), "spec.label")
	mustCreate(t, bad(func(r *v1.Release) { r.Name = "from-file"; r.Spec.Source.URL = "file:///srv/agent.tar.gz" }))
}

func TestProfileSpecValidation(t *testing.T) {
	p := func(name string, mut func(*v1.GatewayProfileSpec)) *v1.GatewayProfile {
		g := profile(name)
		mut(&g.Spec)
		return g
	}
	mustReject(t, p("s1", func(s *v1.GatewayProfileSpec) { s.Mode = v1.EntrypointScript }), "spec.exec", "exec is required when mode is script")
	mustReject(t, p("s2", func(s *v1.GatewayProfileSpec) { s.Exec = "run.py" }), "exec is only allowed when mode is script")
	mustReject(t, p("s3", func(s *v1.GatewayProfileSpec) { s.Mode = v1.EntrypointScript; s.Exec = "../../etc/passwd" }), "spec.exec")
	mustReject(t, p("s4", func(s *v1.GatewayProfileSpec) { s.Mode = "daemon" }), "spec.mode", "Unsupported value")
	mustReject(t, p("s5", func(s *v1.GatewayProfileSpec) { s.Isolation = "None" }), "spec.isolation")
	mustReject(t, p("s6", func(s *v1.GatewayProfileSpec) { s.Env = []v1.EnvVar{{Name: "PYTHONPATH", Value: "/tmp"}} }), "spec.env[0]", "reserved")
	mustReject(t, p("s7", func(s *v1.GatewayProfileSpec) { s.Env = []v1.EnvVar{{Name: "AGENT_ROOT", Value: "/tmp"}} }), "reserved")
	mustReject(t, p("s8", func(s *v1.GatewayProfileSpec) { s.Env = []v1.EnvVar{{Name: "X", Value: "a\nPYTHONPATH=/tmp"}} }), "single line")
	mustReject(t, p("s9", func(s *v1.GatewayProfileSpec) { s.EgressAllowlist = []v1.EgressRule{"any"} }), "spec.egressAllowlist[0]")
	mustReject(t, p("s10", func(s *v1.GatewayProfileSpec) { s.EgressAllowlist = []v1.EgressRule{"10.0.0.0/33"} }), "spec.egressAllowlist[0]")

	ok := p("mcp", func(s *v1.GatewayProfileSpec) {
		s.Mode = v1.EntrypointScript
		s.Exec = "gateways/mcp.py"
		s.Env = []v1.EnvVar{{Name: "MCP_PORT", Value: "8080"}}
		s.EgressAllowlist = []v1.EgressRule{"localhost", "10.0.0.0/8", "192.0.2.1"}
		s.DeniedTools = []string{"shell", "fs.write"}
	})
	mustCreate(t, ok)
	var got v1.GatewayProfile
	if err := cp.Client.Get(context.Background(), client.ObjectKeyFromObject(ok), &got); err != nil {
		t.Fatal(err)
	}
	if got.Spec.Isolation != v1.IsolationProduction || got.Spec.HomeRetention != v1.HomeRetain {
		t.Errorf("defaults: isolation=%q homeRetention=%q, want Production and Retain", got.Spec.Isolation, got.Spec.HomeRetention)
	}
	if p := profile("defaults"); true {
		mustCreate(t, p)
		if p.Spec.Mode != v1.EntrypointCLI {
			t.Errorf("default mode = %q, want cli", p.Spec.Mode)
		}
	}
}

func TestInstanceNameMatchesSpec(t *testing.T) {
	gi := func(name string) *v1.GatewayInstance {
		profile, _, _ := strings.Cut(name, ".")
		return &v1.GatewayInstance{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: v1.GatewayInstanceSpec{
				Profile: profile, Host: "node-1",
				Release: v1.ReleaseArtifact{Name: "r1", URL: "https://example.com/a.tgz", SHA256: sha, Label: "1.0.0"},
			},
		}
	}
	mustCreate(t, gi("core.node-1"))
	mustReject(t, gi("core.node-2"), "metadata.name must be <spec.profile>.<spec.host>")
	// An instance is checked on its own too: the agent would otherwise run it as agent-microvm.
	mustReject(t, gi("microvm.node-1"), "spec.profile", "reserved name")
}

func TestToolRunValidation(t *testing.T) {
	tr := func(name string, limits corev1.ResourceList) *v1.ToolRun {
		return &v1.ToolRun{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec: v1.ToolRunSpec{
				Profile: "core", Image: "registry.example.com/tools/python:3.12",
				Command:   []string{"python", "-c", "print(1)"},
				Resources: corev1.ResourceRequirements{Limits: limits},
			},
		}
	}
	mustReject(t, tr("no-limits", nil), "resources.limits.cpu and resources.limits.memory are required")
	mustReject(t, tr("no-memory", corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1")}), "spec.resources")
	ok := tr("ok", corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("256Mi")})
	mustCreate(t, ok)
	if ok.Spec.TimeoutSeconds != 300 || ok.Spec.Network.Mode != v1.ToolRunNetworkNone {
		t.Errorf("defaults: timeout=%d network=%q, want 300 and None", ok.Spec.TimeoutSeconds, ok.Spec.Network.Mode)
	}
	bad := ok.DeepCopy()
	bad.ObjectMeta = metav1.ObjectMeta{Name: "allow-without-list", Namespace: "default"}
	bad.Spec.Network.Mode = v1.ToolRunNetworkAllowlist
	mustReject(t, bad, "mode Allowlist needs at least one allow entry")
}

// TestExplain checks that `kubectl explain` shows the field documentation people read.
func TestExplain(t *testing.T) {
	out := kubectl(t, "explain", "gatewayprofile.spec")
	for _, want := range []string{"nodeSelector", "selects the GatewayHosts", "isolation", "Production", "egressAllowlist"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl explain gatewayprofile.spec does not show %q:\n%s", want, out)
		}
	}
	out = kubectl(t, "explain", "gatewayprofile.spec.resources")
	for _, want := range []string{"memoryMax", "tasksMax", "64Mi to 64Gi", "default 1Gi", "16 to 65536"} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl explain gatewayprofile.spec.resources does not show %q:\n%s", want, out)
		}
	}
	out = kubectl(t, "explain", "release.spec.sha256")
	if !strings.Contains(out, "64 lowercase hex") {
		t.Errorf("kubectl explain release.spec.sha256:\n%s", out)
	}
}

// kubectl runs the real kubectl against the test control plane as an administrator.
func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	kc, err := cp.Kubeconfig(t.TempDir(), "schema-test-admin", "system:masters")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(cp.Kubectl(), append([]string{"--kubeconfig", kc}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestRolloutValidation(t *testing.T) {
	mu := func(name string, v intstr.IntOrString) *v1.GatewayProfile {
		p := profile(name)
		p.Spec.Rollout.MaxUnavailable = &v
		return p
	}
	mustReject(t, mu("ro1", intstr.FromInt32(0)), "maxUnavailable must be a positive number")
	mustReject(t, mu("ro2", intstr.FromString("0%")), "spec.rollout.maxUnavailable")
	mustReject(t, mu("ro3", intstr.FromString("150%")), "spec.rollout.maxUnavailable")
	mustReject(t, mu("ro4", intstr.FromString("ten")), "spec.rollout.maxUnavailable")
	mustCreate(t, mu("ro5", intstr.FromString("10%")))
	mustCreate(t, mu("ro6", intstr.FromInt32(3)))

	both := profile("ro7")
	two := intstr.FromInt32(2)
	both.Spec.Rollout.Canary = &v1.CanaryStep{Hosts: &two, Selector: &metav1.LabelSelector{}}
	mustReject(t, both, "set exactly one of hosts and selector")
	zero := profile("ro8")
	z := intstr.FromString("0%")
	zero.Spec.Rollout.Canary = &v1.CanaryStep{Hosts: &z}
	mustReject(t, zero, "canary hosts must be a positive number")

	d := profile("ro9")
	mustCreate(t, d)
	if d.Spec.Rollout.MaxUnavailable == nil || d.Spec.Rollout.MaxUnavailable.IntValue() != 1 ||
		d.Spec.Rollout.ProgressDeadlineSeconds != 600 || d.Spec.Rollout.AutoRollback == nil || !*d.Spec.Rollout.AutoRollback {
		t.Errorf("rollout defaults: %+v", d.Spec.Rollout)
	}
}

// TestGatewayResourcesValidation: the resource caps are defaulted, bounded, and refused with a
// message naming the field, on profiles and on the instances the controller writes.
func TestGatewayResourcesValidation(t *testing.T) {
	res := func(name, mem string, tasks int32) *v1.GatewayProfile {
		p := profile(name)
		if mem != "" {
			q := resource.MustParse(mem)
			p.Spec.Resources.MemoryMax = &q
		}
		p.Spec.Resources.TasksMax = tasks
		return p
	}
	for _, tc := range []struct {
		name, mem string
		tasks     int32
		wants     []string
	}{
		{"rs1", "63Mi", 0, []string{"spec.resources.memoryMax", "memoryMax must be from 64Mi to 64Gi"}},
		{"rs2", "65Gi", 0, []string{"spec.resources.memoryMax", "memoryMax must be from 64Mi to 64Gi"}},
		{"rs3", "-1Gi", 0, []string{"memoryMax must be from 64Mi to 64Gi"}},
		{"rs4", "", 15, []string{"spec.resources.tasksMax", "greater than or equal to 16"}},
		{"rs5", "", 65537, []string{"spec.resources.tasksMax", "less than or equal to 65536"}},
		{"rs6", "", -1, []string{"spec.resources.tasksMax"}},
	} {
		t.Run(tc.name, func(t *testing.T) { mustReject(t, res(tc.name, tc.mem, tc.tasks), tc.wants...) })
	}
	mustCreate(t, res("rs-min", v1.MinGatewayMemoryMax, v1.MinGatewayTasksMax))
	mustCreate(t, res("rs-max", v1.MaxGatewayMemoryMax, v1.MaxGatewayTasksMax))
	mustCreate(t, res("rs-bytes", "1073741824", 100))

	d := profile("rs-defaults")
	mustCreate(t, d)
	if d.Spec.Resources.MemoryMax == nil || d.Spec.Resources.MemoryMax.Cmp(resource.MustParse(v1.DefaultGatewayMemoryMax)) != 0 ||
		d.Spec.Resources.TasksMax != v1.DefaultGatewayTasksMax {
		t.Errorf("resources defaults: %+v, want memoryMax %s and tasksMax %d", d.Spec.Resources, v1.DefaultGatewayMemoryMax, v1.DefaultGatewayTasksMax)
	}

	gi := &v1.GatewayInstance{
		ObjectMeta: metav1.ObjectMeta{Name: "core.node-rs"},
		Spec: v1.GatewayInstanceSpec{
			Profile: "core", Host: "node-rs",
			Release: v1.ReleaseArtifact{Name: "r1", URL: "https://example.com/a.tgz", SHA256: sha, Label: "1.0.0"},
		},
	}
	gi.Spec.Resources.TasksMax = 1
	mustReject(t, gi, "spec.resources.tasksMax")
}

// TestSamplesAreValid: every object in config/samples is accepted by the API server as written.
func TestSamplesAreValid(t *testing.T) {
	dir, err := repo.Path("config/samples")
	if err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no samples in %s: %v", dir, err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f) //nolint:gosec // the repository's own samples
		if err != nil {
			t.Fatal(err)
		}
		var obj unstructured.Unstructured
		if err := yaml.Unmarshal(b, &obj.Object); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if err := cp.Client.Create(context.Background(), &obj, client.DryRunAll); err != nil {
			t.Errorf("%s: %v", filepath.Base(f), err)
		}
	}
}
