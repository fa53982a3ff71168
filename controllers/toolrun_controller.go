package controllers

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/recorder"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Labels on everything a tool run makes; the tool-run admission policy matches pods by the
// first.
const (
	LabelToolRun = "gateway.agent.dev/toolrun"
	// maxOutput bounds what a run's status carries, well under a termination message's 4 KiB
	// per container limit times what a kubelet may keep (12 KiB total) plus headroom.
	maxOutput = 16 * 1024
	stdinPath = "/run/toolrun/stdin"
)

// DefaultToolRunStartGrace is how long a run's Pod may wait for a node to start it.
const DefaultToolRunStartGrace = 10 * time.Minute

// ToolRunReconciler runs each ToolRun as one Pod with the Kata RuntimeClass: untrusted code
// gets a microVM of its own, never a gateway's process or a runc container.
type ToolRunReconciler struct {
	Client client.Client
	// APIReader reads what the cache does not hold: Pods without the tool-run label, and the
	// ConfigMaps and NetworkPolicies the manager may get but not list or watch. Client when nil.
	APIReader client.Reader
	Recorder  recorder.EventRecorder
	// RuntimeClass is the Kata RuntimeClass every tool run uses.
	RuntimeClass string
	// TTL is how long a finished run is kept.
	TTL time.Duration
	// StartGrace is how long a run's Pod may wait for a node to start it before the run ends
	// TimedOut (DefaultToolRunStartGrace when 0).
	StartGrace time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// SetupWithManager registers the reconciler; a run's Pod wakes its run.
func (r *ToolRunReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		For(&v1.ToolRun{}).
		Owns(&corev1.Pod{}).
		Complete(r)
}

func (r *ToolRunReconciler) reader() client.Reader {
	if r.APIReader != nil {
		return r.APIReader
	}
	return r.Client
}

// conflict is an object with a run's name that the run does not control: someone else's, so
// the run neither adopts, reads nor deletes it.
type conflict struct {
	reason string
	msg    string
}

func (c *conflict) Error() string { return c.msg }

// owned says whether the object already stored under obj's name is controlled by tr; a
// *conflict when it is not.
func (r *ToolRunReconciler) owned(ctx context.Context, tr *v1.ToolRun, obj client.Object, kind string) error {
	if err := r.reader().Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		return err
	}
	if metav1.IsControlledBy(obj, tr) {
		return nil
	}
	return &conflict{reason: kind + "Conflict", msg: fmt.Sprintf(
		"%s %s/%s exists and is not controlled by this ToolRun: it is left alone; delete it or give the run another name",
		kind, obj.GetNamespace(), obj.GetName())}
}

func (r *ToolRunReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// Reconcile drives one run from creation to cleanup.
func (r *ToolRunReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var tr v1.ToolRun
	if err := r.Client.Get(ctx, req.NamespacedName, &tr); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !tr.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	base := tr.DeepCopy()
	tr.Status.ObservedGeneration = tr.Generation
	res, err := r.reconcileRun(ctx, &tr)
	if !equality.Semantic.DeepEqual(base.Status, tr.Status) {
		if perr := r.Client.Status().Patch(ctx, &tr, client.MergeFrom(base)); perr != nil && err == nil {
			err = client.IgnoreNotFound(perr)
		}
	}
	return res, err
}

func terminal(p v1.ToolRunPhase) bool {
	switch p {
	case v1.ToolRunSucceeded, v1.ToolRunFailed, v1.ToolRunTimedOut, v1.ToolRunRejected:
		return true
	}
	return false
}

func (r *ToolRunReconciler) reconcileRun(ctx context.Context, tr *v1.ToolRun) (ctrl.Result, error) {
	if terminal(tr.Status.Phase) {
		if err := r.removeUnstarted(ctx, tr); err != nil {
			return ctrl.Result{}, err
		}
		return r.expire(ctx, tr)
	}
	var rc nodev1.RuntimeClass
	if err := r.Client.Get(ctx, client.ObjectKey{Name: r.RuntimeClass}, &rc); err != nil {
		if !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
		msg := fmt.Sprintf("RuntimeClass %q does not exist: untrusted tool code runs only in a Kata microVM, never in a plain container", r.RuntimeClass)
		r.finish(tr, v1.ToolRunRejected, "RuntimeClassMissing", msg)
		r.Recorder.Eventf(tr, nil, corev1.EventTypeWarning, "Rejected", "Admit", "%s", msg)
		return ctrl.Result{}, nil
	}
	if tr.Status.PodName == "" {
		why, err := r.notTheProfiles(ctx, tr)
		if err != nil {
			return ctrl.Result{}, err
		}
		if why != "" {
			r.finish(tr, v1.ToolRunRejected, "NotTheProfilesRun", why)
			r.Recorder.Eventf(tr, nil, corev1.EventTypeWarning, "Rejected", "Admit", "%s", why)
			return ctrl.Result{}, nil
		}
	}
	res, err := r.ensureRun(ctx, tr)
	var c *conflict
	if errors.As(err, &c) {
		r.finish(tr, v1.ToolRunRejected, c.reason, c.msg)
		r.Recorder.Eventf(tr, nil, corev1.EventTypeWarning, c.reason, "Run", "%s", c.msg)
		return ctrl.Result{}, nil
	}
	return res, err
}

// notTheProfiles says why a run of a host's cluster route (labeled with the host) is not what
// its profile's instance on that host allows, "" when it is or when the run is no such run. The
// host's agent chose only the command, stdin and timeout; admission checks those, and image and
// resources must be the profile's, which admission cannot read.
func (r *ToolRunReconciler) notTheProfiles(ctx context.Context, tr *v1.ToolRun) (string, error) {
	host, ok := tr.Labels[v1.LabelHost]
	if !ok {
		return "", nil
	}
	if len(validation.IsDNS1123Label(host)) > 0 {
		return fmt.Sprintf("label %s=%q is not a host name", v1.LabelHost, host), nil
	}
	// Straight from the API server: the agent acts on the instance it sees, which the cache
	// may not hold yet.
	var gi v1.GatewayInstance
	err := r.reader().Get(ctx, client.ObjectKey{Name: tr.Spec.Profile + "." + host}, &gi)
	if apierrors.IsNotFound(err) || (err == nil && !gi.DeletionTimestamp.IsZero()) {
		return fmt.Sprintf("profile %s runs no instance on host %s, whose cluster tool runs this run claims to be", tr.Spec.Profile, host), nil
	}
	if err != nil {
		return "", err
	}
	s := gi.Spec.ToolRuns
	switch {
	case s.Slots() == 0:
		return fmt.Sprintf("profile %s has no cluster tool runs (spec.toolRuns.image)", tr.Spec.Profile), nil
	case tr.Spec.Image != s.Image:
		return fmt.Sprintf("image %q is not the profile's (spec.toolRuns.image of instance %s)", tr.Spec.Image, gi.Name), nil
	case !equality.Semantic.DeepEqual(tr.Spec.Resources, s.ClusterResources()):
		return fmt.Sprintf("resources are not the profile's (spec.toolRuns.resources of instance %s)", gi.Name), nil
	}
	return "", nil
}

// ensureRun makes the run's NetworkPolicy, stdin and Pod, or reads the Pod it made.
func (r *ToolRunReconciler) ensureRun(ctx context.Context, tr *v1.ToolRun) (ctrl.Result, error) {
	var pod corev1.Pod
	err := r.Client.Get(ctx, client.ObjectKey{Namespace: tr.Namespace, Name: podName(tr)}, &pod)
	if err == nil && !metav1.IsControlledBy(&pod, tr) {
		return ctrl.Result{}, r.owned(ctx, tr, &pod, "Pod")
	}
	missing := apierrors.IsNotFound(err)
	if err != nil && !missing {
		return ctrl.Result{}, err
	}
	if err := r.ensureNetworkPolicy(ctx, tr); err != nil {
		return ctrl.Result{}, err
	}
	if tr.Spec.Stdin != "" {
		if err := r.ensureStdin(ctx, tr); err != nil {
			return ctrl.Result{}, err
		}
	}
	if missing {
		pod = *r.pod(tr)
		if err := ctrl.SetControllerReference(tr, &pod, r.Client.Scheme()); err != nil {
			return ctrl.Result{}, err
		}
		err = r.Client.Create(ctx, &pod)
		if err == nil {
			tr.Status.Phase, tr.Status.PodName = v1.ToolRunPending, pod.Name
			r.running(tr, "PodCreated", "pod "+pod.Name+" created with RuntimeClass "+r.RuntimeClass)
			r.Recorder.Eventf(tr, &pod, corev1.EventTypeNormal, "PodCreated", "Run", "created pod %s (RuntimeClass %s)", pod.Name, r.RuntimeClass)
			return ctrl.Result{}, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return ctrl.Result{}, fmt.Errorf("create pod: %w", err)
		}
		// Not in the cache: another's Pod without the tool-run label, or ours the cache has not
		// seen yet.
		pod = corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: tr.Namespace, Name: podName(tr)}}
		if err := r.owned(ctx, tr, &pod, "Pod"); err != nil {
			return ctrl.Result{}, err
		}
	}
	r.observe(tr, &pod)
	if terminal(tr.Status.Phase) {
		r.Recorder.Eventf(tr, &pod, corev1.EventTypeNormal, string(tr.Status.Phase), "Run", "tool run finished: %s", tr.Status.Phase)
		return ctrl.Result{RequeueAfter: r.TTL}, nil
	}
	if tr.Status.StartTime != nil {
		return ctrl.Result{}, nil
	}
	// The Pod's deadline counts only once a kubelet has taken it; a Pod no node takes would
	// keep its run Pending for ever, and nobody may be left to delete it.
	if left := tr.CreationTimestamp.Add(r.startGrace()).Sub(r.now()); left > 0 {
		return ctrl.Result{RequeueAfter: left}, nil
	}
	// The run ends first and its Pod goes in the next reconcile, which sees the run ended: a
	// reconcile woken by the Pod's deletion before the cache has the ended run would make the
	// Pod again.
	msg := fmt.Sprintf("no node started pod %s within %s of the run's creation", pod.Name, r.startGrace())
	r.finish(tr, v1.ToolRunTimedOut, reasonNotStarted, msg)
	r.Recorder.Eventf(tr, &pod, corev1.EventTypeWarning, reasonNotStarted, "Run", "%s", msg)
	return ctrl.Result{RequeueAfter: time.Second}, nil
}

// reasonNotStarted ends a run whose Pod no node started within the start grace.
const reasonNotStarted = "NotStarted"

// removeUnstarted deletes the Pod of a run that ended NotStarted, so a node that turns up later
// does not run what nobody waits for any more.
func (r *ToolRunReconciler) removeUnstarted(ctx context.Context, tr *v1.ToolRun) error {
	if tr.Status.Phase != v1.ToolRunTimedOut || tr.Status.StartTime != nil || tr.Status.PodName == "" {
		return nil
	}
	if c := meta.FindStatusCondition(tr.Status.Conditions, v1.ConditionFailed); c == nil || c.Reason != reasonNotStarted {
		return nil
	}
	var pod corev1.Pod
	err := r.Client.Get(ctx, client.ObjectKey{Namespace: tr.Namespace, Name: tr.Status.PodName}, &pod)
	if apierrors.IsNotFound(err) || (err == nil && (!metav1.IsControlledBy(&pod, tr) || !pod.DeletionTimestamp.IsZero())) {
		return nil
	}
	if err != nil {
		return err
	}
	uid := pod.UID
	return client.IgnoreNotFound(r.Client.Delete(ctx, &pod, client.Preconditions{UID: &uid}))
}

func (r *ToolRunReconciler) startGrace() time.Duration {
	if r.StartGrace > 0 {
		return r.StartGrace
	}
	return DefaultToolRunStartGrace
}

// observe copies what the kubelet reported into the run's status.
func (r *ToolRunReconciler) observe(tr *v1.ToolRun, pod *corev1.Pod) {
	st := &tr.Status
	st.PodName = pod.Name
	if pod.Status.StartTime != nil && st.StartTime == nil {
		st.StartTime = pod.Status.StartTime.DeepCopy()
	}
	if pod.Status.Phase == corev1.PodFailed && pod.Status.Reason == "DeadlineExceeded" {
		r.finish(tr, v1.ToolRunTimedOut, "DeadlineExceeded", fmt.Sprintf("killed after %ds", tr.Spec.TimeoutSeconds))
		return
	}
	for _, cs := range pod.Status.ContainerStatuses {
		if cs.Name != "tool" {
			continue
		}
		switch {
		case cs.State.Terminated != nil:
			t := cs.State.Terminated
			code := t.ExitCode
			st.ExitCode = &code
			st.Output, st.OutputTruncated = t.Message, false
			if len(st.Output) > maxOutput {
				st.Output, st.OutputTruncated = st.Output[:maxOutput], true
			}
			if code == 0 {
				r.finish(tr, v1.ToolRunSucceeded, "Succeeded", "the tool exited 0")
			} else {
				r.finish(tr, v1.ToolRunFailed, "NonZeroExit", fmt.Sprintf("the tool exited %d (%s)", code, t.Reason))
			}
			return
		case cs.State.Running != nil:
			st.Phase = v1.ToolRunRunning
			r.running(tr, "Running", "the tool runs in pod "+pod.Name)
			return
		}
	}
	if pod.Status.Phase == corev1.PodFailed {
		r.finish(tr, v1.ToolRunFailed, "PodFailed", pod.Status.Reason+": "+pod.Status.Message)
	}
}

// running says the run is on its way, as a Job's conditions do: neither Complete nor Failed.
func (r *ToolRunReconciler) running(tr *v1.ToolRun, reason, msg string) {
	v1.SetAbnormal(tr, v1.ConditionReconciling, true, reason, msg)
	v1.SetCondition(tr, v1.ConditionComplete, metav1.ConditionFalse, reason, msg)
	v1.SetCondition(tr, v1.ConditionFailed, metav1.ConditionFalse, reason, msg)
}

// finish records the end of a run: Complete when the tool exited 0, Failed otherwise (and
// Stalled, which generic tools read as failed).
func (r *ToolRunReconciler) finish(tr *v1.ToolRun, phase v1.ToolRunPhase, reason, msg string) {
	tr.Status.Phase = phase
	now := metav1.NewTime(r.now())
	tr.Status.CompletionTime = &now
	ok := phase == v1.ToolRunSucceeded
	complete, failed := metav1.ConditionFalse, metav1.ConditionTrue
	if ok {
		complete, failed = metav1.ConditionTrue, metav1.ConditionFalse
	}
	v1.SetCondition(tr, v1.ConditionComplete, complete, reason, msg)
	v1.SetCondition(tr, v1.ConditionFailed, failed, reason, msg)
	v1.SetAbnormal(tr, v1.ConditionReconciling, false, "", "")
	v1.SetAbnormal(tr, v1.ConditionStalled, !ok, reason, msg)
	// What earlier versions reported: a finished run was Ready, even a failed one.
	v1.RemoveCondition(tr, v1.ConditionReady)
	v1.RemoveCondition(tr, v1.ConditionDegraded)
}

// expire deletes a finished run (and what it made) once its TTL has passed.
func (r *ToolRunReconciler) expire(ctx context.Context, tr *v1.ToolRun) (ctrl.Result, error) {
	if tr.Status.CompletionTime == nil {
		return ctrl.Result{}, nil
	}
	left := tr.Status.CompletionTime.Add(r.TTL).Sub(r.now())
	if left > 0 {
		return ctrl.Result{RequeueAfter: left}, nil
	}
	// Owner references let the garbage collector remove the rest; delete them here too, so
	// nothing lingers on clusters (or tests) without one. Only what this run controls: an
	// object of the same name that is someone else's stays.
	for _, o := range []struct {
		obj  client.Object
		kind string
	}{
		{&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: tr.Namespace, Name: podName(tr)}}, "Pod"},
		{&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: tr.Namespace, Name: podName(tr)}}, "NetworkPolicy"},
		{&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: tr.Namespace, Name: podName(tr) + "-stdin"}}, "ConfigMap"},
	} {
		err := r.owned(ctx, tr, o.obj, o.kind)
		var c *conflict
		if apierrors.IsNotFound(err) || errors.As(err, &c) {
			continue
		}
		if err != nil {
			return ctrl.Result{}, err
		}
		// The UID precondition keeps a replacement made since the read from being deleted.
		uid := o.obj.GetUID()
		if err := r.Client.Delete(ctx, o.obj, client.Preconditions{UID: &uid}); client.IgnoreNotFound(err) != nil {
			return ctrl.Result{}, err
		}
	}
	return ctrl.Result{}, client.IgnoreNotFound(r.Client.Delete(ctx, tr))
}

func podName(tr *v1.ToolRun) string { return "trun-" + tr.Name }

// pod is the run's Pod: a Kata microVM, no service-account token, no service links, non-root,
// no privilege escalation, no capabilities, read-only root, RuntimeDefault seccomp, limits
// always set, a deadline, and its output through the termination message.
func (r *ToolRunReconciler) pod(tr *v1.ToolRun) *corev1.Pod {
	no, yes := false, true
	uid := int64(65532)
	deadline := int64(tr.Spec.TimeoutSeconds)
	resources := *tr.Spec.Resources.DeepCopy()
	if resources.Requests == nil {
		resources.Requests = resources.Limits.DeepCopy()
	}
	c := corev1.Container{
		Name: "tool", Image: tr.Spec.Image, Command: tr.Spec.Command, Args: tr.Spec.Args,
		Resources:                resources,
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		SecurityContext: &corev1.SecurityContext{
			AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes, RunAsNonRoot: &yes, RunAsUser: &uid,
			Privileged:     &no,
			Capabilities:   &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		VolumeMounts: []corev1.VolumeMount{{Name: "tmp", MountPath: "/tmp"}},
	}
	volumes := []corev1.Volume{{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{SizeLimit: ptrQuantity("64Mi")}}}}
	if tr.Spec.Stdin != "" {
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "stdin", MountPath: "/run/toolrun", ReadOnly: true})
		c.Env = append(c.Env, corev1.EnvVar{Name: "TOOLRUN_STDIN", Value: stdinPath})
		volumes = append(volumes, corev1.Volume{Name: "stdin", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: podName(tr) + "-stdin"}}}})
	}
	rc := r.RuntimeClass
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: podName(tr), Namespace: tr.Namespace,
			Labels: map[string]string{LabelToolRun: tr.Name, v1.LabelProfile: tr.Spec.Profile},
		},
		Spec: corev1.PodSpec{
			RuntimeClassName:             &rc,
			RestartPolicy:                corev1.RestartPolicyNever,
			ActiveDeadlineSeconds:        &deadline,
			AutomountServiceAccountToken: &no,
			EnableServiceLinks:           &no,
			HostNetwork:                  false,
			SecurityContext: &corev1.PodSecurityContext{
				RunAsNonRoot: &yes, RunAsUser: &uid,
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{c},
			Volumes:    volumes,
		},
	}
}

// ensureNetworkPolicy denies all traffic of the run's Pod, but egress to its allowlist.
func (r *ToolRunReconciler) ensureNetworkPolicy(ctx context.Context, tr *v1.ToolRun) error {
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: podName(tr), Namespace: tr.Namespace, Labels: map[string]string{LabelToolRun: tr.Name}},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{LabelToolRun: tr.Name}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
		},
	}
	if tr.Spec.Network.Mode == v1.ToolRunNetworkAllowlist {
		var peers []networkingv1.NetworkPolicyPeer
		for _, cidr := range tr.Spec.Network.Allow {
			peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr}})
		}
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{To: peers}}
	}
	if err := ctrl.SetControllerReference(tr, np, r.Client.Scheme()); err != nil {
		return err
	}
	if err := r.Client.Create(ctx, np); !apierrors.IsAlreadyExists(err) {
		if err != nil {
			return fmt.Errorf("create network policy: %w", err)
		}
		return nil
	}
	return r.owned(ctx, tr, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: np.Namespace, Name: np.Name}}, "NetworkPolicy")
}

// ensureStdin stores the run's stdin where its Pod reads it.
func (r *ToolRunReconciler) ensureStdin(ctx context.Context, tr *v1.ToolRun) error {
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: podName(tr) + "-stdin", Namespace: tr.Namespace, Labels: map[string]string{LabelToolRun: tr.Name}},
		Data:       map[string]string{"stdin": tr.Spec.Stdin},
	}
	if err := ctrl.SetControllerReference(tr, cm, r.Client.Scheme()); err != nil {
		return err
	}
	if err := r.Client.Create(ctx, cm); !apierrors.IsAlreadyExists(err) {
		if err != nil {
			return fmt.Errorf("create stdin: %w", err)
		}
		return nil
	}
	return r.owned(ctx, tr, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: cm.Namespace, Name: cm.Name}}, "ConfigMap")
}
