package controllers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/recorder"
	"sigs.k8s.io/controller-runtime/pkg/source"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// GatewayHostReconciler marks a host Unreachable when its agent stops heart-beating, and
// releases the instances of a host whose GatewayHost was deleted. An agent heart-beats by
// renewing its host's Lease (coordination.k8s.io/v1, named after the host, in LeaseNamespace),
// as a kubelet renews its node's Lease; an agent that predates Leases beats in the
// GatewayHost's status.lastHeartbeatTime, and the later of the two counts.
type GatewayHostReconciler struct {
	Client client.Client
	// LeaseNamespace holds the hosts' Leases; empty: only status.lastHeartbeatTime counts.
	LeaseNamespace string
	// LeasePollPeriod is how often the Leases are listed; a quarter of GracePeriod when 0.
	LeasePollPeriod time.Duration
	// APIReader reads past the cache: instances are released only once the API server itself
	// says their host is gone. The cached client is used when nil.
	APIReader client.Reader
	Recorder  recorder.EventRecorder
	// GracePeriod is how old a heartbeat may be before the host counts as unreachable.
	GracePeriod time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time

	startOnce sync.Once
	started   time.Time // this reconciler's first reconcile: when it began to watch heartbeats
	leases    *leaseView
}

// indexInstanceHost indexes instances by host, so a gone host's instances are found without
// scanning the fleet.
const indexInstanceHost = "spec.host"

// SetupWithManager registers the reconciler. Besides its hosts it watches instances, so that
// an instance whose host is already gone (deleted while the manager was down) is released too.
// A heartbeat of a reachable host wakes nothing: the check queued for when it would go stale
// reads it. Setup registers the cache indexes it reads by.
//
// With a LeaseNamespace it also reads the hosts' Leases: not through a watch, which would
// hand the manager every renewal of every host (a fleet's largest stream of events), but by
// listing them every LeasePollPeriod (see leaseView).
func (r *GatewayHostReconciler) SetupWithManager(mgr ctrl.Manager) error {
	b := ctrl.NewControllerManagedBy(mgr).
		For(&v1.GatewayHost{}, builder.WithPredicates(hostMattersToItsController)).
		Watches(&v1.GatewayInstance{}, handler.EnqueueRequestsFromMapFunc(r.goneHostOf))
	if r.LeaseNamespace != "" {
		reader := r.APIReader
		if reader == nil {
			reader = r.Client
		}
		period := r.LeasePollPeriod
		if period <= 0 {
			period = max(r.GracePeriod/4, time.Second)
		}
		r.leases = &leaseView{reader: reader, hosts: r.Client, namespace: r.LeaseNamespace, period: period, grace: r.GracePeriod}
		b = b.WatchesRawSource(source.Func(r.leases.start))
	}
	return b.Complete(r)
}

// goneHostOf wakes an instance's host only when the cache no longer holds it (or it is being
// deleted): instance updates of live hosts, the bulk of a rollout, wake nothing.
func (r *GatewayHostReconciler) goneHostOf(ctx context.Context, o client.Object) []reconcile.Request {
	host := o.(*v1.GatewayInstance).Spec.Host
	if host == "" {
		return nil
	}
	var h v1.GatewayHost
	err := r.Client.Get(ctx, client.ObjectKey{Name: host}, &h)
	if err == nil && h.DeletionTimestamp.IsZero() || err != nil && !apierrors.IsNotFound(err) {
		return nil
	}
	return []reconcile.Request{{NamespacedName: client.ObjectKey{Name: host}}}
}

// Reconcile sets the Reachable condition and wakes again when the heartbeat would go stale. A
// deleted host's instances are released.
func (r *GatewayHostReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var h v1.GatewayHost
	if err := r.Client.Get(ctx, req.NamespacedName, &h); err != nil {
		if apierrors.IsNotFound(err) {
			return ctrl.Result{}, r.releaseInstances(ctx, req.Name)
		}
		return ctrl.Result{}, err
	}
	if !h.DeletionTimestamp.IsZero() {
		// Another party's finalizer holds the object, but the host is being decommissioned:
		// nothing will run there, whatever keeps the object.
		return ctrl.Result{}, r.releaseInstances(ctx, req.Name)
	}
	now := time.Now()
	if r.Now != nil {
		now = r.Now()
	}
	r.startOnce.Do(func() { r.started = now })
	was := meta.FindStatusCondition(h.Status.Conditions, v1.ConditionReachable)
	wasReachable, wasUnreachable := was != nil && was.Status == metav1.ConditionTrue, was != nil && was.Status == metav1.ConditionFalse
	last := h.Status.LastHeartbeatTime
	var listed time.Time // when the Leases were last listed
	hasLease := false
	if r.leases != nil {
		renewed, at, ok := r.leases.renewed(h.Name)
		if at.IsZero() {
			// No list of the Leases yet: nothing can be told about this host.
			return ctrl.Result{RequeueAfter: r.leases.period}, nil
		}
		if ok && (last == nil || renewed.After(last.Time)) {
			last = &metav1.Time{Time: renewed}
		}
		listed, hasLease = at, ok
	}
	reachable, msg, next := ReachabilitySince(last, wasReachable, r.GracePeriod, r.started, now)
	if !reachable && wasReachable && last != nil && listed.Before(last.Add(r.GracePeriod)) {
		// The Leases were last listed before this heartbeat went stale: a renewal since then is
		// not seen yet. Look again after the next list.
		return ctrl.Result{RequeueAfter: max(listed.Add(r.leases.period).Sub(now), 0) + time.Second}, nil
	}
	base := h.DeepCopy()
	status, reason := metav1.ConditionTrue, "HeartbeatFresh"
	if !reachable {
		status, reason = metav1.ConditionFalse, "HeartbeatStale"
	}
	v1.SetCondition(&h, v1.ConditionReachable, status, reason, msg)
	if !equality.Semantic.DeepEqual(base.Status, h.Status) {
		// Optimistic lock: the agent writes this status too.
		if err := r.Client.Status().Patch(ctx, &h, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			return ctrl.Result{}, client.IgnoreNotFound(err)
		}
		if !reachable && !wasUnreachable {
			r.Recorder.Eventf(&h, nil, corev1.EventTypeWarning, "Unreachable", "Heartbeat", "%s", msg)
		}
	}
	if next > 0 && !hasLease {
		// A host with a Lease is woken by the list that finds its heartbeat stale.
		return ctrl.Result{RequeueAfter: next}, nil
	}
	return ctrl.Result{}, nil
}

// releaseInstances lets go of every instance of a host whose GatewayHost is gone, as
// Kubernetes deletes the pods of a deleted node: no agent will ever remove their units, so
// the controller removes the units finalizer itself, after saying so in an event.
func (r *GatewayHostReconciler) releaseInstances(ctx context.Context, host string) error {
	reader := r.APIReader
	if reader == nil {
		reader = r.Client
	}
	var live v1.GatewayHost
	switch err := reader.Get(ctx, client.ObjectKey{Name: host}, &live); {
	case err == nil && live.DeletionTimestamp.IsZero():
		return nil // registered again since the cache saw it go: its agent handles its instances
	case err != nil && !apierrors.IsNotFound(err):
		return err
	}
	var list v1.GatewayInstanceList
	if err := r.Client.List(ctx, &list, client.MatchingFields{indexInstanceHost: host}); err != nil {
		return err
	}
	var errs []error
	for i := range list.Items {
		if err := r.release(ctx, &list.Items[i]); err != nil {
			errs = append(errs, fmt.Errorf("release instance %s: %w", list.Items[i].Name, err))
		}
	}
	return errors.Join(errs...)
}

// release removes one instance's units finalizer, then deletes the instance if nobody has yet.
func (r *GatewayHostReconciler) release(ctx context.Context, gi *v1.GatewayInstance) error {
	host := gi.Spec.Host
	if controllerutil.ContainsFinalizer(gi, v1.FinalizerInstanceUnits) {
		why := fmt.Sprintf("GatewayHost %s was deleted: nothing can run there any more, so %s is released without waiting for the host's agent to remove its unit",
			host, gi.Name)
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, "HostGone", "Release", "%s", why)
		var p v1.GatewayProfile
		if err := r.Client.Get(ctx, client.ObjectKey{Name: gi.Spec.Profile}, &p); err == nil {
			r.Recorder.Eventf(&p, gi, corev1.EventTypeWarning, "HostGone", "Release", "%s", why)
		}
		base := gi.DeepCopy()
		controllerutil.RemoveFinalizer(gi, v1.FinalizerInstanceUnits)
		// Optimistic lock: a merge patch replaces the whole finalizer list, and another
		// party's finalizer added meanwhile must stay.
		if err := r.Client.Patch(ctx, gi, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
			return client.IgnoreNotFound(err)
		}
	}
	if gi.DeletionTimestamp.IsZero() {
		// The UID precondition spares a newer instance of a host registered again by now.
		uid := gi.UID
		return client.IgnoreNotFound(r.Client.Delete(ctx, gi, client.Preconditions{UID: &uid}))
	}
	return nil
}

// ReachabilitySince is Reachability for a reconciler that has watched heartbeats only since
// since: a host that was reachable stays so until it has missed a whole grace period under
// this reconciler's eyes. A new leader, or a manager back after an outage of the API server
// (when no heartbeat could land), does not declare every host unreachable at once; a rollout
// would then move them all at once as hosts that serve nothing.
func ReachabilitySince(last *metav1.Time, wasReachable bool, grace time.Duration, since, now time.Time) (bool, string, time.Duration) {
	ok, msg, next := Reachability(last, grace, now)
	if ok || !wasReachable || last == nil || !now.Before(since.Add(grace)) {
		return ok, msg, next
	}
	return true, fmt.Sprintf("last heartbeat %s ago, before this controller was watching; unreachable if none comes within %s",
		now.Sub(last.Time).Round(time.Second), since.Add(grace).Sub(now).Round(time.Second)), since.Add(grace).Sub(now) + time.Second
}

// Reachability decides whether a heartbeat is fresh at now, says so in words, and returns how
// long until it goes stale (0 when it already is). The words do not change while the answer
// stays the same, so that a check finds nothing to write.
func Reachability(last *metav1.Time, grace time.Duration, now time.Time) (bool, string, time.Duration) {
	if last == nil {
		return false, "the host's agent has never reported", 0
	}
	age := now.Sub(last.Time)
	if age > grace {
		return false, fmt.Sprintf("no heartbeat since %s (grace period %s)", last.UTC().Format(time.RFC3339), grace), 0
	}
	return true, fmt.Sprintf("the agent reports within the grace period (%s)", grace), grace - age + time.Second
}
