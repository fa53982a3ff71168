// Package agent is the node agent's controller side: it registers and heart-beats its
// GatewayHost, watches only its own host's GatewayInstances, applies each one with
// nodeagent/apply and writes what it found into the instance's status.
package agent

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/recorder"
	"sigs.k8s.io/controller-runtime/pkg/source"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/drift"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
)

// InstanceReconciler applies this host's GatewayInstances.
type InstanceReconciler struct {
	Client client.Client
	// Reader gets the Secrets and ConfigMaps an instance names straight from the API server:
	// the agent may only get them by name, so it neither lists nor watches nor caches them.
	Reader   client.Reader
	Host     string
	Applier  *apply.Applier
	Recorder recorder.EventRecorder
	// ToolRuns serves each profile's tool-run socket, whose requests Router routes; both nil
	// when the host offers no tool-run route.
	ToolRuns *microvm.Sockets
	Router   *ToolRouter
	// ConcurrentApplies is how many profiles are applied at once (DefaultConcurrentApplies).
	ConcurrentApplies int
	// ApplyTimeout bounds one apply (DefaultApplyTimeout).
	ApplyTimeout time.Duration
	// Hold, when it returns true, stops every apply and removal for now: another agent
	// heart-beats under this host's identity, and the two must not fight over its instances.
	Hold func() bool
	// Drift, when set, holds what was proven per profile and the hints of change the Watcher
	// sends; see drift.go.
	Drift   *drift.Tracker
	Watcher *drift.Watcher
	// ReproveInterval is the backstop: how often an instance is proven again in full although
	// nothing was seen to change (DefaultReproveInterval).
	ReproveInterval time.Duration

	trees releaseTrees
}

// holdRetry is how soon a held instance is looked at again.
const holdRetry = 30 * time.Second

// DefaultConcurrentApplies is how many profiles of one host are applied at once: a profile that
// hangs (a mute gateway, a slow download) holds one of them, never the others.
const DefaultConcurrentApplies = 4

// DefaultApplyTimeout bounds one apply of one profile, download included.
const DefaultApplyTimeout = 10 * time.Minute

// SetupWithManager registers the reconciler. Profiles are applied concurrently; the proof that
// siblings were left alone discounts siblings another apply restarted meanwhile.
func (r *InstanceReconciler) SetupWithManager(mgr ctrl.Manager) error {
	workers := r.ConcurrentApplies
	if workers <= 0 {
		workers = DefaultConcurrentApplies
	}
	found := make(chan event.TypedGenericEvent[*v1.GatewayInstance])
	// Runs once the caches have synced: an instance missing then is really gone.
	if err := mgr.Add(manager.RunnableFunc(r.profilesOnHost(found))); err != nil {
		return err
	}
	b := ctrl.NewControllerManagedBy(mgr)
	if r.Drift != nil {
		b = b.WatchesRawSource(source.Channel(r.driftEvents(), &handler.TypedEnqueueRequestForObject[*v1.GatewayInstance]{}))
	}
	return b.
		Named("gatewayinstance-"+r.Host).
		// Spec and annotation changes (a retry) and deletion only: the agent's own status writes
		// must not wake it.
		For(&v1.GatewayInstance{}, builder.WithPredicates(predicate.Or(predicate.GenerationChangedPredicate{}, predicate.AnnotationChangedPredicate{}, deletionStarted))).
		WatchesRawSource(source.Channel(found, &handler.TypedEnqueueRequestForObject[*v1.GatewayInstance]{})).
		// A failed reconcile (the API server away: the status cannot be written) is tried again
		// at most ten seconds apart, not up to the default 16 minutes: after an outage the host's
		// proof must reach the rollout long before its progress deadline.
		WithOptions(controller.Options{MaxConcurrentReconciles: workers,
			RateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[reconcile.Request](5*time.Millisecond, retryCap)}).
		Complete(r)
}

// retryCap is the longest wait before a failed reconcile is tried again.
const retryCap = 10 * time.Second

// Reconcile applies one instance and reports the outcome in its status.
func (r *InstanceReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	log := ctrl.LoggerFrom(ctx)
	if r.Hold != nil && r.Hold() {
		log.Info("not applying: another agent heart-beats under this host's identity (see the GatewayHost's DuplicateAgent condition)")
		return ctrl.Result{RequeueAfter: holdRetry}, nil
	}
	var gi v1.GatewayInstance
	if err := r.Client.Get(ctx, req.NamespacedName, &gi); err != nil {
		if apierrors.IsNotFound(err) {
			return r.removeOrphan(ctx, req.Name)
		}
		return ctrl.Result{}, err
	}
	if gi.Spec.Host != r.Host {
		// The cache only holds this host's instances; anything else is not ours to touch.
		return ctrl.Result{}, nil
	}
	if !gi.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, &gi)
	}
	in := apply.Instance{
		Profile: gi.Spec.Profile,
		Release: release.Artifact{URL: gi.Spec.Release.URL, SHA256: gi.Spec.Release.SHA256, Label: gi.Spec.Release.Label},
		Mode:    gi.Spec.Mode, Exec: gi.Spec.Exec, Isolation: gi.Spec.Isolation, Env: gi.Spec.Env,
		DeniedTools: gi.Spec.DeniedTools,
		KeepFailed:  gi.Spec.AutoRollback != nil && !*gi.Spec.AutoRollback,
	}
	in.MemoryMax, in.TasksMax = limits(gi.Spec.Resources)
	restartToken, restart := v1.Requested(&gi, v1.AnnotationRestart, gi.Status.LastHandledRestart)
	in.Restart = restart
	if hp := gi.Spec.HealthProbe; hp != nil {
		in.Probe = apply.Probe{Count: int(max(hp.SuccessThreshold, 1)), Period: time.Duration(max(hp.PeriodSeconds, 1)) * time.Second}
	}
	for _, e := range gi.Spec.EgressAllowlist {
		in.Egress = append(in.Egress, string(e))
	}
	if in.Mode == "" {
		in.Mode = v1.EntrypointCLI
	}
	if in.Isolation == "" {
		in.Isolation = v1.IsolationProduction
	}
	if gi.Spec.Material != nil || gi.Spec.UsesMaterial() {
		m, wait := r.material(ctx, &gi)
		if wait != nil {
			return r.waitForMaterial(ctx, &gi, wait)
		}
		in.Env, in.Files, in.MaterialDigest = m.Env, m.Files, m.Digest
	}

	if res, done, err := r.checkDrift(ctx, &gi, &in); done {
		return res, err
	}

	applyCtx, cancel := context.WithTimeout(ctx, r.applyTimeout())
	out, err := r.Applier.Apply(applyCtx, in)
	cancel()
	base := gi.DeepCopy()
	st := &gi.Status
	// A new spec proven is a new alignment: its time starts the rollout's minReadySeconds,
	// which would otherwise count from the first release this instance was ever proven on.
	if st.ObservedGeneration != gi.Generation && err == nil {
		v1.RemoveCondition(&gi, v1.ConditionAligned)
	}
	st.ObservedGeneration = gi.Generation
	// The retry request this apply answers (the annotation as read before applying).
	st.LastHandledRetry = v1.RequestToken(gi.Annotations[v1.AnnotationRetry])
	if restart {
		// Acted on, whatever the outcome: a failed restart is reported in the conditions.
		st.LastHandledRestart = restartToken
	}
	st.Unit = "agent-gateway@" + gi.Spec.Profile + ".service"
	var failure *apply.Failure
	switch {
	case err == nil:
		r.reportSuccess(&gi, out)
		r.expectDrift(ctx, gi.Spec.Profile, out)
		if out.Restarted {
			r.Recorder.Eventf(&gi, nil, corev1.EventTypeNormal, "Restarted", "Apply",
				"restarted %s on release %s and proved it aligned (main PID %d)", st.Unit, gi.Spec.Release.Label, out.MainPID)
		}
	case errors.As(err, &failure):
		r.reportFailure(&gi, failure, out)
		r.Recorder.Eventf(&gi, nil, corev1.EventTypeWarning, failure.Reason, "Apply", "%s", failure.Error())
	default:
		return ctrl.Result{}, err
	}
	if out != nil {
		r.serveToolRuns(&gi, out)
	}
	if perr := r.Client.Status().Patch(ctx, &gi, client.MergeFrom(base)); perr != nil {
		return ctrl.Result{}, fmt.Errorf("write status: %w", perr)
	}
	if failure != nil {
		log.Info("apply failed", "step", failure.Step, "reason", failure.Reason, "message", failure.Message, "rolledBack", failure.RolledBack)
		if failure.Retry {
			return ctrl.Result{}, failure
		}
		// The spec itself is bad or the release failed its proof: try again only when the spec
		// changes, or after a long while.
		return ctrl.Result{RequeueAfter: r.reproveInterval()}, nil
	}
	return ctrl.Result{RequeueAfter: r.reproveInterval()}, nil
}

// limits converts an instance's resource caps to bytes and a count; unset stays zero, the
// renderer's default. The renderer checks the bounds; a quantity beyond int64 becomes the
// largest int64 of its sign so that the check refuses it instead of it wrapping around.
func limits(r v1.GatewayResources) (memory, tasks int64) {
	if q := r.MemoryMax; q != nil {
		switch {
		case q.Cmp(*resource.NewQuantity(math.MaxInt64, resource.BinarySI)) > 0:
			memory = math.MaxInt64
		case q.Cmp(*resource.NewQuantity(math.MinInt64, resource.BinarySI)) < 0:
			memory = math.MinInt64
		default:
			memory = q.Value() // a fraction of a byte rounds up
		}
	}
	return memory, int64(r.TasksMax)
}

// deletionStarted lets through the update that marks an instance for deletion.
var deletionStarted = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		return e.ObjectOld.GetDeletionTimestamp().IsZero() && !e.ObjectNew.GetDeletionTimestamp().IsZero()
	},
	CreateFunc:  func(event.CreateEvent) bool { return false },
	DeleteFunc:  func(event.DeleteEvent) bool { return false },
	GenericFunc: func(event.GenericEvent) bool { return false },
}

func summary(name string, r apply.Ref) *v1.ReleaseSummary {
	return &v1.ReleaseSummary{Name: name, Label: r.Label, SHA256: r.SHA256}
}

func (r *InstanceReconciler) reportSuccess(gi *v1.GatewayInstance, out *apply.Outcome) {
	st := &gi.Status
	st.ConfigHash = gi.Spec.ConfigHash
	st.CurrentRelease = summary(gi.Spec.Release.Name, out.Current)
	if out.LastGood != nil {
		st.LastGoodRelease = summary(gi.Spec.Release.Name, *out.LastGood)
	}
	st.MainPID = int64(out.MainPID)
	proof := out.Alignment
	st.Alignment = &proof
	iso := out.Isolation
	st.Isolation = &iso
	msg := fmt.Sprintf("main PID %d imports release %s (%s) through %s", out.MainPID, out.Current.Label, out.Current.SHA256[:12], proof.PythonPath)
	v1.SetCondition(gi, v1.ConditionAligned, metav1.ConditionTrue, "Proven", msg)
	v1.SetCondition(gi, v1.ConditionReady, metav1.ConditionTrue, "Applied", "running release "+out.Current.Label)
	v1.SetCondition(gi, v1.ConditionDegraded, metav1.ConditionFalse, "Applied", "the last apply succeeded")
	v1.SetAbnormal(gi, v1.ConditionStalled, false, "", "")
	if out.Isolated {
		v1.SetCondition(gi, v1.ConditionIsolated, metav1.ConditionTrue, out.IsolationReason, iso.Message)
	} else {
		v1.SetCondition(gi, v1.ConditionIsolated, metav1.ConditionFalse, orUnknown(out.IsolationReason), iso.Message)
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// reportFailure reports a failed apply. out, when the apply returned one, is what the host runs
// now (after a rollback: the last good release, its main PID and its proof), and replaces
// what the status said before.
func (r *InstanceReconciler) reportFailure(gi *v1.GatewayInstance, f *apply.Failure, out *apply.Outcome) {
	st := &gi.Status
	msg := f.Error()
	v1.SetCondition(gi, v1.ConditionDegraded, metav1.ConditionTrue, f.Reason, msg)
	v1.SetCondition(gi, v1.ConditionReady, metav1.ConditionFalse, f.Reason, msg)
	// The host waits for a new spec or a retry: nothing changes by itself.
	v1.SetAbnormal(gi, v1.ConditionStalled, true, f.Reason, msg)
	if out != nil {
		st.MainPID = int64(out.MainPID)
		st.Alignment = nil
		if out.Alignment.CheckedAt != nil {
			proof := out.Alignment
			st.Alignment = &proof
		}
		if out.Current.SHA256 != "" {
			name := gi.Spec.Release.Name
			if st.LastGoodRelease != nil && st.LastGoodRelease.SHA256 == out.Current.SHA256 {
				name = st.LastGoodRelease.Name
			}
			st.CurrentRelease = summary(name, out.Current)
		} else {
			st.CurrentRelease = nil
		}
	}
	if f.RolledBack && st.LastGoodRelease != nil {
		st.CurrentRelease = st.LastGoodRelease.DeepCopy()
		v1.SetCondition(gi, v1.ConditionAligned, metav1.ConditionFalse, "RolledBack",
			fmt.Sprintf("release %s failed; the host runs the last good release %s, proven on main PID %d", gi.Spec.Release.Label, st.LastGoodRelease.Label, st.MainPID))
	} else if st.CurrentRelease == nil || st.CurrentRelease.SHA256 != gi.Spec.Release.SHA256 {
		v1.SetCondition(gi, v1.ConditionAligned, metav1.ConditionFalse, f.Reason, "the host does not run release "+gi.Spec.Release.Label)
	} else if out != nil && out.Alignment.CheckedAt == nil {
		v1.SetCondition(gi, v1.ConditionAligned, metav1.ConditionFalse, f.Reason, "release "+gi.Spec.Release.Label+" is in place but not proven")
	}
}

// serveToolRuns makes sure an applied profile's gateway has its tool-run socket.
func (r *InstanceReconciler) serveToolRuns(gi *v1.GatewayInstance, out *apply.Outcome) {
	if r.ToolRuns == nil || out.User == nil {
		return
	}
	p, err := layout.ForProfile(gi.Spec.Profile)
	if err != nil {
		return
	}
	if r.Router != nil {
		r.Router.SetProfile(p.Name, gi.Spec.ToolRuns)
	}
	if err := r.ToolRuns.Ensure(p.Name, r.Applier.Host.On(p.Home), microvm.Owner{UID: out.User.UID, GID: out.User.GID}); err != nil {
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, "ToolRunSocketFailed", "Apply", "%v", err)
	}
}

// reconcileDelete removes the instance's unit from the host, then lets the object go.
func (r *InstanceReconciler) reconcileDelete(ctx context.Context, gi *v1.GatewayInstance) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(gi, v1.FinalizerInstanceUnits) {
		return ctrl.Result{}, nil
	}
	r.stopToolRuns(gi.Spec.Profile)
	r.forgetDrift(gi.Spec.Profile)
	if err := r.Applier.Remove(ctx, gi.Spec.Profile, gi.Spec.HomeRetention == v1.HomePurge); err != nil {
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, "RemoveFailed", "Remove", "removing %s: %v", gi.Spec.Profile, err)
		return ctrl.Result{}, err
	}
	r.Recorder.Eventf(gi, nil, corev1.EventTypeNormal, "Removed", "Remove", "stopped and removed agent-gateway@%s.service", gi.Spec.Profile)
	base := gi.DeepCopy()
	controllerutil.RemoveFinalizer(gi, v1.FinalizerInstanceUnits)
	if err := r.Client.Patch(ctx, gi, client.MergeFrom(base)); err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, err
	}
	return ctrl.Result{}, nil
}

// stopToolRuns takes a profile's tool-run socket away and forgets its settings.
func (r *InstanceReconciler) stopToolRuns(profile string) {
	if r.ToolRuns != nil {
		r.ToolRuns.Remove(profile)
	}
	if r.Router != nil {
		r.Router.Forget(profile)
	}
}
