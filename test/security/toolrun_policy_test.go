package security_test

// The tool-run side of the model: config/policies/toolrun_policy.yaml holds every tool-run Pod
// to the Kata hardening for its whole life, config/policies/manager_policy.yaml holds the
// controller manager's own identity to the objects of ToolRuns, and the ToolRun controller,
// run as that identity, leaves alone what is not its own.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	nodev1 "k8s.io/api/node/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
)

const (
	toolRunPolicy = "gateway-toolrun-pods"
	managerPolicy = "gateway-manager-toolrun-objects"
	// runsNS holds the tool runs of these tests.
	runsNS = "toolruns"
)

var (
	toolRunOnce sync.Once
	toolRunErr  error
	// dev may do anything with Pods of runsNS, ephemeral containers (kubectl debug) included.
	dev client.Client
	// manager is the controller manager's identity, under config/rbac/role.yaml.
	manager client.Client
)

// toolRunSetUp applies the tool-run and manager policies once and waits until both are
// enforced.
func toolRunSetUp(t *testing.T) {
	t.Helper()
	toolRunOnce.Do(func() { toolRunErr = setUpToolRuns(context.Background()) })
	if toolRunErr != nil {
		t.Fatal(toolRunErr)
	}
}

func setUpToolRuns(ctx context.Context) error {
	for _, file := range []string{"config/policies/toolrun_policy.yaml", "config/policies/manager_policy.yaml"} {
		if err := applyFile(ctx, file); err != nil {
			return err
		}
	}
	for _, o := range []client.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: runsNS}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: runsNS}},
		&nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "kata"}, Handler: "kata"},
		&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "pod-admin", Namespace: runsNS}, Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{""}, Verbs: []string{"*"},
			Resources: []string{"pods", "pods/ephemeralcontainers", "pods/status", "pods/resize"}}}},
		&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "dev", Namespace: runsNS},
			RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "pod-admin"},
			Subjects: []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: "User", Name: "dev"}}},
	} {
		if err := admin.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	var err error
	if dev, _, err = newUser("dev"); err != nil {
		return err
	}
	if manager, _, err = newUser(managerSA, "system:serviceaccounts", "system:serviceaccounts:gateway-operator-system"); err != nil {
		return err
	}
	// The API server loads policies asynchronously: wait until each refuses what it should.
	for _, w := range []struct {
		policy string
		c      client.Client
		pod    func() *corev1.Pod
	}{
		{toolRunPolicy, dev, func() *corev1.Pod {
			p := hardenedPod("probe", "probe")
			p.Spec.RuntimeClassName = nil
			return p
		}},
		{managerPolicy, manager, func() *corev1.Pod { return plainPod("probe") }},
	} {
		deadline := time.Now().Add(60 * time.Second)
		for {
			err = w.c.Create(ctx, w.pod())
			if err == nil {
				_ = admin.Delete(ctx, w.pod())
			}
			if err != nil && strings.Contains(err.Error(), w.policy) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("within 60s, %s never refused a pod; last answer: %v", w.policy, err)
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	return nil
}

// hardenedPod is a tool-run Pod as the controller makes it, labeled for run.
func hardenedPod(name, run string) *corev1.Pod {
	no, yes, uid := false, true, int64(65532)
	rc, deadline := "kata", int64(60)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: runsNS, Labels: map[string]string{controllers.LabelToolRun: run}},
		Spec: corev1.PodSpec{
			RuntimeClassName: &rc, RestartPolicy: corev1.RestartPolicyNever, ActiveDeadlineSeconds: &deadline,
			AutomountServiceAccountToken: &no, EnableServiceLinks: &no,
			SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: &yes, RunAsUser: &uid,
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
			Containers: []corev1.Container{{
				Name: "tool", Image: "registry.example.com/tool:1",
				Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
					corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("256Mi")}},
				SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes,
					RunAsNonRoot: &yes, Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
				VolumeMounts: []corev1.VolumeMount{{Name: "tmp", MountPath: "/tmp"}},
			}},
			Volumes: []corev1.Volume{{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
	}
}

func plainPod(name string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: runsNS},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.example.com/app:1"}}}}
}

// withVolume is a hardened tool-run Pod that also mounts v.
func withVolume(name string, v corev1.VolumeSource) *corev1.Pod {
	p := hardenedPod(name, name)
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "extra", VolumeSource: v})
	p.Spec.Containers[0].VolumeMounts = append(p.Spec.Containers[0].VolumeMounts, corev1.VolumeMount{Name: "extra", MountPath: "/extra"})
	return p
}

// refusedBy checks err is a refusal by policy whose message has every text; allowed when policy
// is empty.
func refusedBy(t *testing.T, err error, policy string, text ...string) {
	t.Helper()
	if policy == "" {
		if err != nil {
			t.Fatalf("refused; want allowed: %v", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("allowed; want refused by %s (%s)", policy, strings.Join(text, "; "))
	}
	if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+policy+"'") {
		t.Fatalf("want a refusal by %s, got %v", policy, err)
	}
	for _, want := range text {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal does not mention %q:\n%v", want, err)
		}
	}
	t.Logf("refused: %v", err)
}

// createPod creates p as c, and removes it as admin when the test ends.
func createPod(ctx context.Context, t *testing.T, c client.Client, p *corev1.Pod) error {
	err := c.Create(ctx, p)
	if err == nil {
		deleteLater(t, p)
	}
	return err
}

func TestToolRunPodVolumes(t *testing.T) {
	toolRunSetUp(t)
	ctx := context.Background()
	exp := int64(3600)
	volumes := "volumes may only be emptyDir or configMap"
	for _, c := range []struct {
		name string
		src  corev1.VolumeSource
		want string
	}{
		{"configmap", corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "trun-configmap-stdin"}}}, ""},
		{"projected-token", corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{{
			ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token", ExpirationSeconds: &exp}}}}}, volumes},
		{"secret", corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "db-password"}}, volumes},
		{"host-path", corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/var/run"}}, volumes},
		{"pvc", corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "data"}}, volumes},
		{"csi", corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: "secrets-store.csi.k8s.io"}}, volumes},
		{"nfs", corev1.VolumeSource{NFS: &corev1.NFSVolumeSource{Server: "10.0.0.1", Path: "/"}}, volumes},
	} {
		t.Run(c.name, func(t *testing.T) {
			policy := toolRunPolicy
			if c.want == "" {
				policy = ""
			}
			p := withVolume("vol-"+c.name, c.src)
			// A projected token needs a named service account, as the API server sets on a real cluster.
			p.Spec.ServiceAccountName = "default"
			refusedBy(t, createPod(ctx, t, dev, p), policy, c.want)
		})
	}
	t.Run("env-from-secret", func(t *testing.T) {
		p := hardenedPod("env-secret", "env-secret")
		p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: "db-password"}, Key: "password"}}}}
		refusedBy(t, createPod(ctx, t, dev, p), toolRunPolicy, "environment variables may only have literal values")
	})
	t.Run("host-port", func(t *testing.T) {
		p := hardenedPod("host-port", "host-port")
		p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 8080, HostPort: 8080}}
		refusedBy(t, createPod(ctx, t, dev, p), toolRunPolicy, "may not bind a host port")
	})
	t.Run("envfrom-secret", func(t *testing.T) {
		p := hardenedPod("envfrom-secret", "envfrom-secret")
		p.Spec.Containers[0].EnvFrom = []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "db-password"}}}}
		refusedBy(t, createPod(ctx, t, dev, p), toolRunPolicy, "environment variables may only have literal values")
	})
}

// TestToolRunPodStaysHardened: what can change a Pod after its creation cannot take a tool-run
// Pod out of its hardening or out of its NetworkPolicy.
func TestToolRunPodStaysHardened(t *testing.T) {
	toolRunSetUp(t)
	ctx := context.Background()
	run := hardenedPod("kept", "kept")
	refusedBy(t, createPod(ctx, t, dev, run), "")
	other := plainPod("other")
	refusedBy(t, createPod(ctx, t, dev, other), "")

	debug := func(p *corev1.Pod) error {
		var cur corev1.Pod
		if err := dev.Get(ctx, client.ObjectKeyFromObject(p), &cur); err != nil {
			return err
		}
		yes := true
		cur.Spec.EphemeralContainers = append(cur.Spec.EphemeralContainers, corev1.EphemeralContainer{
			EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "debugger", Image: "busybox",
				SecurityContext: &corev1.SecurityContext{Privileged: &yes}},
			TargetContainerName: p.Spec.Containers[0].Name})
		return dev.SubResource("ephemeralcontainers").Update(ctx, &cur)
	}
	label := func(sub, patch string) func() error {
		return func() error {
			if sub == "" {
				return dev.Patch(ctx, run, mergePatch(patch))
			}
			return dev.SubResource(sub).Patch(ctx, run, mergePatch(patch))
		}
	}
	keep := "the gateway.agent.dev/toolrun label may not be removed or changed"
	for _, c := range []struct {
		name   string
		do     func() error
		policy string
		text   string
	}{
		// The control: the API server does add a debug container to an ordinary Pod.
		{"kubectl debug adds a privileged container to an ordinary pod", func() error { return debug(other) }, "", ""},
		{"kubectl debug adds a privileged container to a tool-run pod", func() error { return debug(run) }, toolRunPolicy,
			"may not have ephemeral containers"},
		{"the tool-run label is removed", label("", `{"metadata":{"labels":{"gateway.agent.dev/toolrun":null}}}`), toolRunPolicy, keep},
		{"the tool-run label is changed", label("", `{"metadata":{"labels":{"gateway.agent.dev/toolrun":"other"}}}`), toolRunPolicy, keep},
		{"the tool-run label is removed through pods/status", label("status", `{"metadata":{"labels":{"gateway.agent.dev/toolrun":null}}}`),
			toolRunPolicy, keep},
		{"another label is added", label("", `{"metadata":{"labels":{"team":"search"}}}`), "", ""},
		{"the kubelet reports status", label("status", `{"status":{"phase":"Running"}}`), "", ""},
	} {
		t.Run(c.name, func(t *testing.T) { refusedBy(t, c.do(), c.policy, c.text) })
	}
	var got corev1.Pod
	if err := admin.Get(ctx, client.ObjectKeyFromObject(run), &got); err != nil {
		t.Fatal(err)
	}
	if got.Labels[controllers.LabelToolRun] != "kept" || len(got.Spec.EphemeralContainers) != 0 {
		t.Errorf("the tool-run pod changed: labels %v, %d ephemeral containers", got.Labels, len(got.Spec.EphemeralContainers))
	}
}

func toolRunObj(name, stdin string) *v1.ToolRun {
	return &v1.ToolRun{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: runsNS},
		Spec: v1.ToolRunSpec{Profile: "core", Image: "registry.example.com/tools/python:3.12",
			Command: []string{"python", "-c", "print('hi')"}, Stdin: stdin,
			Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
				corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("256Mi")}},
			TimeoutSeconds: 30},
	}
}

// controlledBy is an owner reference making tr the controller of an object.
func controlledBy(tr *v1.ToolRun) []metav1.OwnerReference {
	yes := true
	return []metav1.OwnerReference{{APIVersion: v1.GroupVersion.String(), Kind: "ToolRun", Name: tr.Name, UID: tr.UID, Controller: &yes}}
}

// eventLog keeps the type and reason of every event a reconciler records.
type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (l *eventLog) Eventf(_, _ runtime.Object, typ, reason, _, _ string, _ ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, typ+" "+reason)
}

func (l *eventLog) AnnotatedEventf(o, related runtime.Object, _ map[string]string, typ, reason, action, note string, args ...any) {
	l.Eventf(o, related, typ, reason, action, note, args...)
}

func (l *eventLog) has(event string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Contains(l.events, event)
}

// reconcileAs drives the ToolRun controller by hand as c, at now, recording events into log.
func reconcileAs(t *testing.T, c client.Client, log *eventLog, tr *v1.ToolRun, now time.Time) *v1.ToolRun {
	t.Helper()
	r := &controllers.ToolRunReconciler{Client: c, APIReader: c, Recorder: log, RuntimeClass: "kata", TTL: time.Minute,
		Now: func() time.Time { return now }}
	if _, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: client.ObjectKeyFromObject(tr)}); err != nil {
		t.Fatalf("reconcile %s as %s: %v", tr.Name, managerSA, err)
	}
	var got v1.ToolRun
	if err := admin.Get(context.Background(), client.ObjectKeyFromObject(tr), &got); client.IgnoreNotFound(err) != nil {
		t.Fatal(err)
	}
	return &got
}

func exists(t *testing.T, o client.Object) bool {
	t.Helper()
	err := admin.Get(context.Background(), client.ObjectKeyFromObject(o), o)
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatal(err)
	}
	return err == nil
}

// TestManagerRunsToolRuns: the ToolRun controller, as the manager's identity under its role and
// both policies, makes a run's NetworkPolicy, stdin and Pod and removes them after the TTL.
func TestManagerRunsToolRuns(t *testing.T) {
	toolRunSetUp(t)
	ctx := context.Background()
	// The longest name the schema admits: trun-<name> and trun-<name>-stdin are still valid.
	name := "work-" + strings.Repeat("x", 58)
	tr := toolRunObj(name, "question")
	if err := admin.Create(ctx, tr); err != nil {
		t.Fatal(err)
	}
	got := reconcileAs(t, manager, &eventLog{}, tr, time.Now())
	if got.Status.Phase != v1.ToolRunPending {
		t.Fatalf("phase %q, want Pending; conditions %+v", got.Status.Phase, got.Status.Conditions)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: runsNS, Name: "trun-" + name}}
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: runsNS, Name: "trun-" + name}}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: runsNS, Name: "trun-" + name + "-stdin"}}
	for _, o := range []client.Object{pod, np, cm} {
		if !exists(t, o) || !metav1.IsControlledBy(o, got) {
			t.Fatalf("%s %s missing or not controlled by the run", fmt.Sprintf("%T", o), o.GetName())
		}
	}
	// The kubelet reports the tool done; a reconcile after the TTL deletes everything.
	now := metav1.Now()
	pod.Status = corev1.PodStatus{Phase: corev1.PodSucceeded, StartTime: &now, ContainerStatuses: []corev1.ContainerStatus{{
		Name: "tool", Image: pod.Spec.Containers[0].Image,
		State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}}}}}
	if err := admin.Status().Update(ctx, pod); err != nil {
		t.Fatal(err)
	}
	if got = reconcileAs(t, manager, &eventLog{}, tr, time.Now()); got.Status.Phase != v1.ToolRunSucceeded {
		t.Fatalf("phase %q, want Succeeded", got.Status.Phase)
	}
	reconcileAs(t, manager, &eventLog{}, tr, time.Now().Add(time.Hour))
	for _, o := range []client.Object{pod, np, cm, tr} {
		if exists(t, o) && o.GetDeletionTimestamp() == nil {
			t.Errorf("%T %s is still there after the TTL", o, o.GetName())
		}
	}
}

// TestManagerIdentityIsNarrow: what the manager's role would allow but no ToolRun needs is
// refused, by the role where Kubernetes can say it and by the manager policy otherwise.
func TestManagerIdentityIsNarrow(t *testing.T) {
	toolRunSetUp(t)
	ctx := context.Background()
	tr := toolRunObj("narrow", "")
	if err := admin.Create(ctx, tr); err != nil {
		t.Fatal(err)
	}
	deleteLater(t, tr)
	victimPod := plainPod("victim")
	victimCM := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "victim", Namespace: runsNS}}
	victimNP := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "victim", Namespace: runsNS}}
	for _, o := range []client.Object{victimPod, victimCM, victimNP} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	unlabeled := hardenedPod("trun-narrow", "narrow")
	unlabeled.Labels = nil
	unlabeled.OwnerReferences = controlledBy(tr)
	openNP := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "trun-narrow", Namespace: runsNS, OwnerReferences: controlledBy(tr)},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{}}},
	}
	otherCM := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kube-config", Namespace: runsNS, OwnerReferences: controlledBy(tr)}}
	notOwned := "it creates and deletes only objects a ToolRun controls"
	for _, c := range []struct {
		name   string
		do     func() error
		policy string
		text   []string
	}{
		{"creates a pod without an owning ToolRun", func() error { return createPod(ctx, t, manager, plainPod("rogue")) },
			managerPolicy, []string{"may not create Pod toolruns/rogue", notOwned}},
		{"creates an unlabeled pod for a ToolRun", func() error { return createPod(ctx, t, manager, unlabeled) },
			managerPolicy, []string{"carries the label gateway.agent.dev/toolrun=narrow"}},
		{"creates a NetworkPolicy opening every pod's ingress", func() error { deleteLater(t, openNP); return manager.Create(ctx, openNP) },
			managerPolicy, []string{"selects exactly the Pods labeled gateway.agent.dev/toolrun=narrow and admits no ingress"}},
		{"creates a ConfigMap not named for its ToolRun", func() error { deleteLater(t, otherCM); return manager.Create(ctx, otherCM) },
			managerPolicy, []string{"the object of ToolRun narrow is named trun-narrow-stdin"}},
		{"deletes a pod it does not own", func() error { return manager.Delete(ctx, victimPod) },
			managerPolicy, []string{"may not delete Pod toolruns/victim", notOwned}},
		{"deletes a ConfigMap it does not own", func() error { return manager.Delete(ctx, victimCM) },
			managerPolicy, []string{"may not delete ConfigMap toolruns/victim", notOwned}},
		{"deletes a NetworkPolicy it does not own", func() error { return manager.Delete(ctx, victimNP) },
			managerPolicy, []string{"may not delete NetworkPolicy toolruns/victim", notOwned}},
	} {
		t.Run(c.name, func(t *testing.T) { refusedBy(t, c.do(), c.policy, c.text...) })
	}
	// What the role no longer grants.
	for _, c := range []struct {
		name string
		do   func() error
		want string
	}{
		{"lists ConfigMaps", func() error { return manager.List(ctx, &corev1.ConfigMapList{}) }, `cannot list resource "configmaps"`},
		{"lists NetworkPolicies", func() error { return manager.List(ctx, &networkingv1.NetworkPolicyList{}) }, `cannot list resource "networkpolicies"`},
		{"updates a ConfigMap", func() error { return manager.Update(ctx, victimCM) }, `cannot update resource "configmaps"`},
		{"patches a node's lease", func() error {
			return manager.Patch(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Namespace: "kube-node-lease"}}, mergePatch(`{}`))
		}, `cannot patch resource "leases"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.do()
			if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("want RBAC to refuse (%s), got %v", c.want, err)
			}
		})
	}
}

// TestToolRunLeavesForeignObjects: an object named as a run's that the run does not control is
// neither adopted, read as the run's, nor deleted; the run is rejected and says why.
func TestToolRunLeavesForeignObjects(t *testing.T) {
	toolRunSetUp(t)
	ctx := context.Background()
	foreignPod := plainPod("trun-foreign")
	foreignCM := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "trun-foreignstdin-stdin", Namespace: runsNS},
		Data: map[string]string{"stdin": "someone else's"}}
	// Someone else's NetworkPolicy under the run's name: taking it as the run's would give the run
	// whatever it allows.
	foreignNP := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "trun-foreignnp", Namespace: runsNS},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{}}}}
	for _, o := range []client.Object{foreignPod, foreignCM, foreignNP} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	for _, c := range []struct {
		run    *v1.ToolRun
		theirs client.Object
		reason string
	}{
		{toolRunObj("foreign", ""), foreignPod, "PodConflict"},
		{toolRunObj("foreignstdin", "question"), foreignCM, "ConfigMapConflict"},
		{toolRunObj("foreignnp", ""), foreignNP, "NetworkPolicyConflict"},
	} {
		t.Run(c.reason, func(t *testing.T) {
			if err := admin.Create(ctx, c.run); err != nil {
				t.Fatal(err)
			}
			log := &eventLog{}
			got := reconcileAs(t, manager, log, c.run, time.Now())
			failed := meta.FindStatusCondition(got.Status.Conditions, v1.ConditionFailed)
			if got.Status.Phase != v1.ToolRunRejected || failed == nil || failed.Status != metav1.ConditionTrue || failed.Reason != c.reason ||
				!strings.Contains(failed.Message, "is not controlled by this ToolRun") {
				t.Fatalf("phase %q, Failed condition %+v; want Rejected for %s", got.Status.Phase, failed, c.reason)
			}
			if !log.has(corev1.EventTypeWarning + " " + c.reason) {
				t.Errorf("no %s warning event; events: %v", c.reason, log.events)
			}
			t.Logf("Failed: %s", failed.Message)
			// After the TTL the run goes, and what is not its own stays, unchanged.
			reconcileAs(t, manager, log, c.run, time.Now().Add(time.Hour))
			if exists(t, c.run) {
				t.Error("the rejected run is still there after the TTL")
			}
			if !exists(t, c.theirs) || c.theirs.GetDeletionTimestamp() != nil || len(c.theirs.GetOwnerReferences()) != 0 {
				t.Errorf("%s was deleted or adopted: %+v", c.theirs.GetName(), c.theirs.GetOwnerReferences())
			}
		})
	}
}

// TestToolRunNameLength: a ToolRun name becomes a label value, so the schema stops at 63.
func TestToolRunNameLength(t *testing.T) {
	ctx := context.Background()
	tr := toolRunObj(strings.Repeat("n", 64), "")
	tr.Namespace = "default"
	err := admin.Create(ctx, tr)
	if err == nil {
		deleteLater(t, tr)
		t.Fatal("a ToolRun named with 64 characters was admitted")
	}
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "a ToolRun name is at most 63 characters") {
		t.Fatalf("want the schema to refuse a 64-character name, got %v", err)
	}
	t.Logf("refused: %v", err)
}
