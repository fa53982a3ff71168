package controllers_test

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	nodev1 "k8s.io/api/node/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

// No kubelet runs here: fakeKubelet writes the Pod status a kubelet would.

func toolRun(name string) *v1.ToolRun {
	return &v1.ToolRun{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: v1.ToolRunSpec{Profile: "core", Image: "registry.example.com/tools/python:3.12",
			Command: []string{"python", "-c", "print('hi')"},
			Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{
				corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("256Mi")}},
			TimeoutSeconds: 30},
	}
}

func ensureKata(t testing.TB) {
	t.Helper()
	rc := &nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "kata"}, Handler: "kata"}
	if err := c.Create(context.Background(), rc); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

func waitPod(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	eventually(t, "pod "+name, func() (bool, string) {
		err := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &pod)
		return err == nil, fmt.Sprint(err)
	})
	return &pod
}

// fakeKubelet reports a Pod's container as terminated, or the Pod as past its deadline.
func fakeKubelet(t *testing.T, pod *corev1.Pod, exit int32, message string, deadline bool) {
	t.Helper()
	now := metav1.Now()
	pod.Status.StartTime = &now
	if deadline {
		pod.Status.Phase, pod.Status.Reason = corev1.PodFailed, "DeadlineExceeded"
	} else {
		pod.Status.Phase = corev1.PodSucceeded
		if exit != 0 {
			pod.Status.Phase = corev1.PodFailed
		}
		pod.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "tool", Image: pod.Spec.Containers[0].Image,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: exit, Message: message, Reason: "Completed"}}}}
	}
	if err := c.Status().Update(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
}

func waitRun(t *testing.T, name string, phase v1.ToolRunPhase) *v1.ToolRun {
	t.Helper()
	var tr v1.ToolRun
	eventually(t, name+" "+string(phase), func() (bool, string) {
		_ = c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &tr)
		return tr.Status.Phase == phase, fmt.Sprintf("%+v", tr.Status)
	})
	return &tr
}

// jobLike checks a run's conditions say what a Job's would: Complete or Failed, plus
// Reconciling while it runs and Stalled once it failed; no Ready.
func jobLike(t *testing.T, tr *v1.ToolRun, complete, failed, running bool) {
	t.Helper()
	conds := tr.Status.Conditions
	is := func(typ string) bool { return meta.IsStatusConditionTrue(conds, typ) }
	if is(v1.ConditionComplete) != complete || is(v1.ConditionFailed) != failed || is(v1.ConditionReconciling) != running ||
		is(v1.ConditionStalled) != failed || meta.FindStatusCondition(conds, v1.ConditionReady) != nil {
		t.Errorf("run %s (%s): want Complete=%v Failed=%v Reconciling=%v Stalled=%v and no Ready; got %+v",
			tr.Name, tr.Status.Phase, complete, failed, running, failed, conds)
	}
	for _, cond := range conds {
		if cond.ObservedGeneration != tr.Generation {
			t.Errorf("run %s: condition %s observed generation %d, not %d", tr.Name, cond.Type, cond.ObservedGeneration, tr.Generation)
		}
	}
}

func TestToolRunPodIsAHardenedKataMicroVM_FakeKubelet(t *testing.T) {
	ensureKata(t)
	tr := toolRun("ok")
	tr.Spec.Stdin = "question"
	mustCreate(t, tr)
	pod := waitPod(t, "trun-ok")
	s := pod.Spec
	ctr := s.Containers[0]
	sc := ctr.SecurityContext
	switch {
	case s.RuntimeClassName == nil || *s.RuntimeClassName != "kata":
		t.Errorf("runtimeClassName %v", s.RuntimeClassName)
	case s.AutomountServiceAccountToken == nil || *s.AutomountServiceAccountToken:
		t.Error("a service-account token is mounted")
	case s.EnableServiceLinks == nil || *s.EnableServiceLinks:
		t.Error("service links are on")
	case s.RestartPolicy != corev1.RestartPolicyNever || s.ActiveDeadlineSeconds == nil || *s.ActiveDeadlineSeconds != 30:
		t.Errorf("restart %s deadline %v", s.RestartPolicy, s.ActiveDeadlineSeconds)
	case sc == nil || *sc.AllowPrivilegeEscalation || !*sc.ReadOnlyRootFilesystem || !*sc.RunAsNonRoot || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL":
		t.Errorf("container security context %+v", sc)
	case s.SecurityContext.SeccompProfile == nil || s.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Error("no RuntimeDefault seccomp profile")
	case ctr.Resources.Limits.Cpu().IsZero() || ctr.Resources.Limits.Memory().IsZero():
		t.Error("limits missing")
	case ctr.TerminationMessagePolicy != corev1.TerminationMessageFallbackToLogsOnError:
		t.Error("output does not go through the termination message")
	case len(pod.OwnerReferences) != 1 || pod.OwnerReferences[0].Name != "ok":
		t.Errorf("owners %v", pod.OwnerReferences)
	}
	var np networkingv1.NetworkPolicy
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "trun-ok"}, &np); err != nil {
		t.Fatalf("no network policy: %v", err)
	}
	if len(np.Spec.PolicyTypes) != 2 || len(np.Spec.Egress) != 0 || len(np.Spec.Ingress) != 0 {
		t.Errorf("network policy is not default-deny: %+v", np.Spec)
	}
	var cm corev1.ConfigMap
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "trun-ok-stdin"}, &cm); err != nil || cm.Data["stdin"] != "question" {
		t.Errorf("stdin: %v %v", cm.Data, err)
	}

	jobLike(t, waitRun(t, "ok", v1.ToolRunPending), false, false, true)
	fakeKubelet(t, pod, 0, "hello\n", false)
	got := waitRun(t, "ok", v1.ToolRunSucceeded)
	jobLike(t, got, true, false, false)
	if got.Status.ExitCode == nil || *got.Status.ExitCode != 0 || got.Status.Output != "hello\n" || got.Status.CompletionTime == nil {
		t.Errorf("status %+v", got.Status)
	}
}

func TestToolRunOutcomes_FakeKubelet(t *testing.T) {
	ensureKata(t)
	mustCreate(t, toolRun("fails"))
	fakeKubelet(t, waitPod(t, "trun-fails"), 3, "boom", false)
	failed := waitRun(t, "fails", v1.ToolRunFailed)
	if failed.Status.ExitCode == nil || *failed.Status.ExitCode != 3 {
		t.Errorf("exit code %v", failed.Status.ExitCode)
	}
	jobLike(t, failed, false, true, false)

	mustCreate(t, toolRun("slow"))
	fakeKubelet(t, waitPod(t, "trun-slow"), 0, "", true)
	slow := waitRun(t, "slow", v1.ToolRunTimedOut)
	jobLike(t, slow, false, true, false)
	if f := meta.FindStatusCondition(slow.Status.Conditions, v1.ConditionFailed); f == nil || f.Reason != "DeadlineExceeded" {
		t.Errorf("a timed-out run's Failed condition: %+v", f)
	}

	mustCreate(t, toolRun("chatty"))
	fakeKubelet(t, waitPod(t, "trun-chatty"), 0, strings.Repeat("x", 20000), false)
	got := waitRun(t, "chatty", v1.ToolRunSucceeded)
	if len(got.Status.Output) != 16*1024 || !got.Status.OutputTruncated {
		t.Errorf("output %d bytes, truncated=%v", len(got.Status.Output), got.Status.OutputTruncated)
	}
}

func TestToolRunWithoutRuntimeClassIsRejected(t *testing.T) {
	ctx := context.Background()
	if err := c.Delete(ctx, &nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "kata"}}); client.IgnoreNotFound(err) != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ensureKata(t) })
	mustCreate(t, toolRun("norc"))
	got := waitRun(t, "norc", v1.ToolRunRejected)
	jobLike(t, got, false, true, false)
	found := false
	for _, cond := range got.Status.Conditions {
		found = found || strings.Contains(cond.Message, `RuntimeClass "kata" does not exist`)
	}
	if !found {
		t.Errorf("conditions do not say why: %+v", got.Status.Conditions)
	}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "trun-norc"}, &corev1.Pod{}); !apierrors.IsNotFound(err) {
		t.Errorf("a pod was created without the Kata RuntimeClass: %v", err)
	}
}

func TestToolRunExpiresAfterTTL(t *testing.T) {
	ensureKata(t)
	r := &controllers.ToolRunReconciler{Client: c, RuntimeClass: "kata", TTL: time.Minute, Recorder: nopRecorder{},
		Now: func() time.Time { return time.Now().Add(2 * time.Minute) }}
	tr := toolRun("expire")
	mustCreate(t, tr)
	fakeKubelet(t, waitPod(t, "trun-expire"), 0, "done", false)
	waitRun(t, "expire", v1.ToolRunSucceeded)
	if _, err := r.Reconcile(context.Background(), reqFor(tr)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the run and its pod to be gone", func() (bool, string) {
		e1 := c.Get(context.Background(), client.ObjectKeyFromObject(tr), &v1.ToolRun{})
		e2 := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "trun-expire"}, &corev1.Pod{})
		return apierrors.IsNotFound(e1) && (apierrors.IsNotFound(e2) || e2 == nil), fmt.Sprint(e1, e2)
	})
}

// TestToolRunPolicyRejectsUnsafePod applies config/policies/toolrun_policy.yaml and checks that
// a hand-made tool-run Pod without the Kata RuntimeClass or the hardening is refused, while the
// controller's own Pod passes.
func TestToolRunPolicyRejectsUnsafePod(t *testing.T) {
	ensureKata(t)
	kubectlApply(t, "config/policies/toolrun_policy.yaml")
	ctx := context.Background()
	unsafe := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "sneaky", Namespace: "default", Labels: map[string]string{controllers.LabelToolRun: "sneaky"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "tool", Image: "busybox"}}},
	}
	var err error
	eventually(t, "the policy to refuse an unsafe tool-run pod", func() (bool, string) {
		err = c.Create(ctx, unsafe)
		if err == nil {
			_ = c.Delete(ctx, unsafe)
			unsafe.ResourceVersion = ""
		}
		return err != nil, "created"
	})
	if !strings.Contains(err.Error(), "runtimeClassName must be kata") {
		t.Errorf("refusal: %v", err)
	}
	// With the runtime class alone it is still refused, for the next missing protection.
	rc := "kata"
	unsafe.Spec.RuntimeClassName = &rc
	if err := c.Create(ctx, unsafe); err == nil || !strings.Contains(err.Error(), "automountServiceAccountToken must be false") {
		t.Errorf("kata but no hardening: %v", err)
	}
	// An ordinary Pod is not affected.
	plain := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "plain", Namespace: "default"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "x", Image: "busybox"}}}}
	if err := c.Create(ctx, plain); err != nil {
		t.Errorf("an unlabeled pod was refused: %v", err)
	}
	// The controller's Pods pass the policy.
	mustCreate(t, toolRun("policed"))
	waitPod(t, "trun-policed")
}

func kubectlApply(t *testing.T, file string) {
	t.Helper()
	kc, err := cp.Kubeconfig(t.TempDir(), "toolrun-admin", "system:masters")
	if err != nil {
		t.Fatal(err)
	}
	f, err := repo.Path(file)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cp.Kubectl(), "--kubeconfig", kc, "apply", "-f", f).CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply %s: %v\n%s", file, err, out)
	}
}

// TestClusterRouteRunIsTheProfiles: a run labeled with a host is a gateway's request on that
// host's cluster route, whose agent chose only the command, stdin and timeout: it runs only
// with the image and resources its profile's instance on that host states, else it is
// Rejected and makes no Pod.
func TestClusterRouteRunIsTheProfiles(t *testing.T) {
	ensureKata(t)
	mustCreate(t, host("cr-1", map[string]string{"pool": "cr"}))
	simulatedAgentHeartbeats(t, "cr-1")
	mustCreate(t, rel("cr-r1", "1.0.0", shaA))
	p := profile("cr", "cr-r1", map[string]string{"pool": "cr"})
	p.Spec.ToolRuns = &v1.ToolRunSettings{Route: v1.ToolRunRouteCluster, Image: "registry.example.com/tools/python:3.12"}
	mustCreate(t, p)
	eventually(t, "cr.cr-1 to carry the profile's tool-run settings", func() (bool, string) {
		gi, err := getInstance("cr.cr-1")
		return err == nil && gi.Spec.ToolRuns != nil, fmt.Sprint(err)
	})
	route := func(name, hostName string, edit func(*v1.ToolRun)) *v1.ToolRun {
		tr := toolRun(name)
		tr.Spec.Profile = "cr"
		tr.Labels = map[string]string{v1.LabelHost: hostName, v1.LabelProfile: "cr"}
		tr.Spec.Resources = p.Spec.ToolRuns.ClusterResources()
		edit(tr)
		return tr
	}
	for _, tc := range []struct {
		run  *v1.ToolRun
		want string
	}{
		{route("cr-image", "cr-1", func(tr *v1.ToolRun) { tr.Spec.Image = "registry.example.com/miner:1" }),
			`image "registry.example.com/miner:1" is not the profile's`},
		{route("cr-res", "cr-1", func(tr *v1.ToolRun) {
			tr.Spec.Resources.Limits[corev1.ResourceCPU] = resource.MustParse("64")
		}), "resources are not the profile's"},
		{route("cr-host", "cr-2", func(*v1.ToolRun) {}), "profile cr runs no instance on host cr-2"},
		{route("cr-label", "CR_1", func(*v1.ToolRun) {}), `label gateway.agent.dev/host="CR_1" is not a host name`},
	} {
		mustCreate(t, tc.run)
		got := waitRun(t, tc.run.Name, v1.ToolRunRejected)
		found := false
		for _, cond := range got.Status.Conditions {
			found = found || strings.Contains(cond.Message, tc.want)
		}
		if !found {
			t.Errorf("%s: conditions do not say %q: %+v", tc.run.Name, tc.want, got.Status.Conditions)
		}
		if err := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "trun-" + tc.run.Name}, &corev1.Pod{}); !apierrors.IsNotFound(err) {
			t.Errorf("%s: a pod was made: %v", tc.run.Name, err)
		}
	}
	ok := route("cr-ok", "cr-1", func(*v1.ToolRun) {})
	mustCreate(t, ok)
	if pod := waitPod(t, "trun-cr-ok"); pod.Spec.Containers[0].Image != p.Spec.ToolRuns.Image {
		t.Errorf("pod image %s", pod.Spec.Containers[0].Image)
	}
}

// TestToolRunThatNeverStartsTimesOut: a run whose Pod no kubelet ever takes (no node can run
// it) ends TimedOut once its start grace has passed, and its Pod goes, so the run expires
// like any other, even when whoever created it is no longer there to delete it.
func TestToolRunThatNeverStartsTimesOut(t *testing.T) {
	ensureKata(t)
	r := &controllers.ToolRunReconciler{Client: c, RuntimeClass: "kata", TTL: time.Hour, Recorder: nopRecorder{},
		Now: func() time.Time { return time.Now().Add(controllers.DefaultToolRunStartGrace + time.Minute) }}
	tr := toolRun("nostart")
	mustCreate(t, tr)
	waitPod(t, "trun-nostart")
	waitRun(t, "nostart", v1.ToolRunPending)
	if _, err := r.Reconcile(context.Background(), reqFor(tr)); err != nil {
		t.Fatal(err)
	}
	got := waitRun(t, "nostart", v1.ToolRunTimedOut)
	jobLike(t, got, false, true, false)
	eventually(t, "its pod to go", func() (bool, string) {
		var pod corev1.Pod
		err := c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: "trun-nostart"}, &pod)
		return apierrors.IsNotFound(err) || (err == nil && !pod.DeletionTimestamp.IsZero()), fmt.Sprint(err)
	})
}
