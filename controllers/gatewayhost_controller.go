package controllers

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/recorder"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// GatewayHostReconciler marks a host Unreachable when its agent stops heart-beating.
type GatewayHostReconciler struct {
	Client   client.Client
	Recorder recorder.EventRecorder
	// GracePeriod is how old a heartbeat may be before the host counts as unreachable.
	GracePeriod time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// SetupWithManager registers the reconciler.
func (r *GatewayHostReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).For(&v1.GatewayHost{}).Complete(r)
}

// Reconcile sets the Reachable condition and wakes again when the heartbeat would go stale.
func (r *GatewayHostReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var h v1.GatewayHost
	if err := r.Client.Get(ctx, req.NamespacedName, &h); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	now := time.Now()
	if r.Now != nil {
		now = r.Now()
	}
	reachable, msg, next := Reachability(h.Status.LastHeartbeatTime, r.GracePeriod, now)
	base := h.DeepCopy()
	cond := metav1.Condition{Type: v1.ConditionReachable, Status: metav1.ConditionTrue, Reason: "HeartbeatFresh",
		Message: msg, ObservedGeneration: h.Generation}
	if !reachable {
		cond.Status, cond.Reason = metav1.ConditionFalse, "HeartbeatStale"
	}
	was := meta.FindStatusCondition(h.Status.Conditions, v1.ConditionReachable)
	meta.SetStatusCondition(&h.Status.Conditions, cond)
	if !equality.Semantic.DeepEqual(base.Status, h.Status) {
		// Optimistic lock: the agent writes this status too.
		if err := r.Client.Status().Patch(ctx, &h, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			return ctrl.Result{}, client.IgnoreNotFound(err)
		}
		if !reachable && (was == nil || was.Status != metav1.ConditionFalse) {
			r.Recorder.Eventf(&h, nil, corev1.EventTypeWarning, "Unreachable", "Heartbeat", "%s", msg)
		}
	}
	if next > 0 {
		return ctrl.Result{RequeueAfter: next}, nil
	}
	return ctrl.Result{}, nil
}

// Reachability decides whether a heartbeat is fresh at now, says so in words, and returns how
// long until it goes stale (0 when it already is).
func Reachability(last *metav1.Time, grace time.Duration, now time.Time) (bool, string, time.Duration) {
	if last == nil {
		return false, "the host's agent has never reported", 0
	}
	age := now.Sub(last.Time)
	if age > grace {
		return false, fmt.Sprintf("no heartbeat for %s (grace period %s)", age.Round(time.Second), grace), 0
	}
	return true, fmt.Sprintf("heartbeat %s ago", age.Round(time.Second)), grace - age + time.Second
}
