package controllers

import (
	"context"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// A fleet's hosts heart-beat every few seconds each. The watches below keep those status writes
// from waking controllers whose decisions do not depend on them.

// indexProfileRelease indexes profiles by the release they name, so a release's change wakes
// its profiles without listing every profile.
const indexProfileRelease = "spec.release"

// indexFields registers the cache indexes the reconcilers read by; Setup calls it once, before
// any reconciler is set up.
func indexFields(mgr ctrl.Manager) error {
	ctx := context.Background()
	idx := mgr.GetFieldIndexer()
	if err := idx.IndexField(ctx, &v1.GatewayInstance{}, indexInstanceProfile,
		func(o client.Object) []string { return []string{o.(*v1.GatewayInstance).Spec.Profile} }); err != nil {
		return err
	}
	if err := idx.IndexField(ctx, &v1.GatewayInstance{}, indexInstanceHost,
		func(o client.Object) []string { return []string{o.(*v1.GatewayInstance).Spec.Host} }); err != nil {
		return err
	}
	if err := idx.IndexField(ctx, &v1.GatewayProfile{}, indexProfileSecrets, profileSecrets); err != nil {
		return err
	}
	if err := idx.IndexField(ctx, &v1.GatewayProfile{}, indexProfileConfigMaps, profileConfigMaps); err != nil {
		return err
	}
	return idx.IndexField(ctx, &v1.GatewayProfile{}, indexProfileRelease,
		func(o client.Object) []string { return []string{o.(*v1.GatewayProfile).Spec.Release} })
}

// hostReachable is whether the planner counts a host as reachable: only an explicit False
// makes it unreachable, as the rollout reads it.
func hostReachable(h *v1.GatewayHost) bool {
	return !meta.IsStatusConditionFalse(h.Status.Conditions, v1.ConditionReachable)
}

// hostMattersToProfiles passes a host update only when something a profile decides on changed:
// its labels (the nodeSelector and canary selector), spec.unschedulable, whether it is
// reachable, or its deletion. A heartbeat changes none of them.
var hostMattersToProfiles = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, okOld := e.ObjectOld.(*v1.GatewayHost)
		n, okNew := e.ObjectNew.(*v1.GatewayHost)
		if !okOld || !okNew {
			return true
		}
		return !equality.Semantic.DeepEqual(o.Labels, n.Labels) ||
			o.Spec.Unschedulable != n.Spec.Unschedulable ||
			hostReachable(o) != hostReachable(n) ||
			o.DeletionTimestamp.IsZero() != n.DeletionTimestamp.IsZero()
	},
}

// hostMattersToItsController passes a host update the host controller must act on at once. A
// fresh heartbeat of a reachable host is not one: the check already queued for when the
// heartbeat it saw goes stale reads the newer one then. A heartbeat that moved backwards (a
// clock set back) is, since that check would come too late.
var hostMattersToItsController = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, okOld := e.ObjectOld.(*v1.GatewayHost)
		n, okNew := e.ObjectNew.(*v1.GatewayHost)
		if !okOld || !okNew {
			return true
		}
		if !meta.IsStatusConditionTrue(n.Status.Conditions, v1.ConditionReachable) ||
			!n.DeletionTimestamp.IsZero() || o.Generation != n.Generation {
			return true
		}
		was, now := o.Status.LastHeartbeatTime, n.Status.LastHeartbeatTime
		return was == nil || now == nil || now.Before(was)
	},
}

// profilesOfHost wakes the profiles a host's change can concern: those whose nodeSelector
// matches its labels before or after the change, and every profile being deleted (it may
// wait for this host's agent).
func (r *GatewayProfileReconciler) profilesOfHost() handler.Funcs {
	enqueue := func(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request], hosts ...client.Object) {
		var list v1.GatewayProfileList
		// Read-only views of the cache: only names and selectors are read.
		if err := r.Client.List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
			return
		}
		for i := range list.Items {
			p := &list.Items[i]
			if !p.DeletionTimestamp.IsZero() || selectsAny(p, hosts) {
				q.Add(reconcile.Request{NamespacedName: client.ObjectKeyFromObject(p)})
			}
		}
	}
	return handler.Funcs{
		CreateFunc: func(ctx context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, q, e.Object)
		},
		UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, q, e.ObjectOld, e.ObjectNew)
		},
		DeleteFunc: func(ctx context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, q, e.Object)
		},
		GenericFunc: func(ctx context.Context, e event.GenericEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			enqueue(ctx, q, e.Object)
		},
	}
}

// selectsAny is whether the profile's nodeSelector matches any of the hosts' labels. A selector
// that does not parse wakes the profile, which reports it.
func selectsAny(p *v1.GatewayProfile, hosts []client.Object) bool {
	sel, err := metav1.LabelSelectorAsSelector(&p.Spec.NodeSelector)
	if err != nil {
		return true
	}
	for _, h := range hosts {
		if sel.Matches(labels.Set(h.GetLabels())) {
			return true
		}
	}
	return false
}

// profilesOfRelease wakes the profiles that name a release.
func (r *GatewayProfileReconciler) profilesOfRelease(ctx context.Context, o client.Object) []reconcile.Request {
	var list v1.GatewayProfileList
	if err := r.Client.List(ctx, &list, client.MatchingFields{indexProfileRelease: o.GetName()}, client.UnsafeDisableDeepCopy); err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(list.Items))
	for i := range list.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&list.Items[i])})
	}
	return reqs
}

// releasesOfProfile wakes the releases a profile's change concerns: the one it names now and,
// when the profile moved to another, the one it named before (which no longer counts it as a
// user). A status write, the bulk of a rollout, changes neither and wakes nothing.
func releasesOfProfile() handler.Funcs {
	add := func(q workqueue.TypedRateLimitingInterface[reconcile.Request], o client.Object) {
		if name := o.(*v1.GatewayProfile).Spec.Release; name != "" {
			q.Add(reconcile.Request{NamespacedName: client.ObjectKey{Name: name}})
		}
	}
	return handler.Funcs{
		CreateFunc: func(_ context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			add(q, e.Object)
		},
		UpdateFunc: func(_ context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			o, n := e.ObjectOld.(*v1.GatewayProfile), e.ObjectNew.(*v1.GatewayProfile)
			if o.Spec.Release != n.Spec.Release {
				add(q, o)
				add(q, n)
			} else if o.DeletionTimestamp.IsZero() != n.DeletionTimestamp.IsZero() {
				add(q, n)
			}
		},
		DeleteFunc: func(_ context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			add(q, e.Object)
		},
		GenericFunc: func(_ context.Context, e event.GenericEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			add(q, e.Object)
		},
	}
}
