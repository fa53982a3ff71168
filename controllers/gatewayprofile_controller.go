package controllers

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/recorder"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// FinalizerProfileInstances keeps a GatewayProfile until every host removed its unit.
const FinalizerProfileInstances = "gateway.agent.dev/instances"

// GatewayProfileReconciler writes one GatewayInstance per (profile, selected host) and sums
// up the instances' status in the profile's.
type GatewayProfileReconciler struct {
	Client   client.Client
	Recorder recorder.EventRecorder
	// MaterialNamespace holds the Secrets and ConfigMaps profiles name; the manager caches
	// those of this namespace only.
	MaterialNamespace string
}

// indexInstanceProfile indexes instances by profile, so a reconcile reads its own instances
// without scanning every instance of the fleet.
const indexInstanceProfile = "spec.profile"

// instanceBatch is how long instance events are gathered before their profile is reconciled:
// during a rollout hundreds of hosts report within moments, and one reconcile serves them all.
// Each reconcile reads every instance of the profile, so on a large fleet the reconciles, not
// the hosts, set the manager's CPU; a second's wait is small beside a wave's applies.
const instanceBatch = time.Second

// replan is how soon a profile decided on a stale copy is decided again.
const replan = 50 * time.Millisecond

// SetupWithManager registers the reconciler: a profile is reconciled when it, one of its
// instances, a host it selects (in what the profile decides on, never a mere heartbeat), or
// its release changes. Setup registers the cache indexes it reads by.
func (r *GatewayProfileReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return r.setupWith(mgr, r)
}

// setupWith registers rec behind the profile controller's watches.
func (r *GatewayProfileReconciler) setupWith(mgr ctrl.Manager, rec reconcile.Reconciler) error {
	batch := func(o client.Object, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
		if p := o.(*v1.GatewayInstance).Spec.Profile; p != "" {
			q.AddAfter(reconcile.Request{NamespacedName: client.ObjectKey{Name: p}}, instanceBatch)
		}
	}
	return ctrl.NewControllerManagedBy(mgr).
		For(&v1.GatewayProfile{}).
		Watches(&v1.GatewayInstance{}, handler.Funcs{
			CreateFunc: func(_ context.Context, e event.CreateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				batch(e.Object, q)
			},
			UpdateFunc: func(_ context.Context, e event.UpdateEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				batch(e.ObjectNew, q)
			},
			DeleteFunc: func(_ context.Context, e event.DeleteEvent, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				batch(e.Object, q)
			},
		}).
		Watches(&v1.GatewayHost{}, r.profilesOfHost(), builder.WithPredicates(hostMattersToProfiles)).
		Watches(&v1.Release{}, handler.EnqueueRequestsFromMapFunc(r.profilesOfRelease)).
		Watches(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.profilesOfMaterial(indexProfileSecrets))).
		Watches(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(r.profilesOfMaterial(indexProfileConfigMaps))).
		Complete(rec)
}

// Reconcile brings a profile's instances in line with its spec and reports their state. The
// status is written once, at the end, whatever happened on the way.
func (r *GatewayProfileReconciler) Reconcile(ctx context.Context, req ctrl.Request) (res ctrl.Result, retErr error) {
	var p v1.GatewayProfile
	if err := r.Client.Get(ctx, req.NamespacedName, &p); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	instances, err := r.instancesOf(ctx, p.Name)
	if err != nil {
		return ctrl.Result{}, err
	}
	if p.DeletionTimestamp.IsZero() && controllerutil.AddFinalizer(&p, FinalizerProfileInstances) {
		if err := r.Client.Update(ctx, &p); err != nil {
			return ctrl.Result{}, err
		}
	}
	base := p.DeepCopy()
	defer func() {
		switch err := r.patchStatus(ctx, base, &p); {
		case err == nil:
		case apierrors.IsConflict(err) && retErr == nil:
			// Decided on a stale copy: decide again on the fresh one. What was done on the
			// way is idempotent (instance specs, request tokens not yet recorded).
			res = ctrl.Result{RequeueAfter: replan}
		default:
			retErr = kerrors.NewAggregate([]error{retErr, fmt.Errorf("write status: %w", err)})
		}
	}()
	p.Status.ObservedGeneration = p.Generation
	if !p.DeletionTimestamp.IsZero() {
		return r.reconcileDelete(ctx, &p, instances)
	}
	return r.reconcileNormal(ctx, &p, instances)
}

func (r *GatewayProfileReconciler) instancesOf(ctx context.Context, profile string) (map[string]*v1.GatewayInstance, error) {
	var list v1.GatewayInstanceList
	// Read-only views of the cache's objects (no copy of thousands of instances per reconcile);
	// whoever changes one copies it first.
	if err := r.Client.List(ctx, &list, client.MatchingFields{indexInstanceProfile: profile}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	byHost := make(map[string]*v1.GatewayInstance, len(list.Items))
	for i := range list.Items {
		byHost[list.Items[i].Spec.Host] = &list.Items[i]
	}
	return byHost, nil
}

// reconcileNormal rolls the profile's target out over its selected hosts, removes instances
// from hosts no longer selected, then computes the status.
func (r *GatewayProfileReconciler) reconcileNormal(ctx context.Context, p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance) (ctrl.Result, error) {
	var rel v1.Release
	if err := r.Client.Get(ctx, client.ObjectKey{Name: p.Spec.Release}, &rel); err != nil {
		if !apierrors.IsNotFound(err) {
			return ctrl.Result{}, err
		}
		msg := fmt.Sprintf("Release %q does not exist; hosts keep what they run", p.Spec.Release)
		summarize(p, instances, nil, nil)
		setState(p, metav1.ConditionFalse, "ReleaseNotFound", msg, stateStalled)
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "ReleaseNotFound", "Plan", "%s", msg)
		return ctrl.Result{}, nil
	}
	if !rel.DeletionTimestamp.IsZero() {
		msg := fmt.Sprintf("Release %q is being deleted; hosts keep what they run", rel.Name)
		summarize(p, instances, &rel, nil)
		setState(p, metav1.ConditionFalse, "ReleaseDeleting", msg, stateStalled)
		return ctrl.Result{}, nil
	}

	mat, err := r.material(ctx, p)
	if err != nil {
		var me *v1.MaterialError
		if !errors.As(err, &me) {
			return ctrl.Result{}, err
		}
		// Nothing moves: every host keeps the material it runs until the objects are mended.
		msg := me.Msg + "; hosts keep the material they run"
		summarize(p, instances, &rel, nil)
		setState(p, metav1.ConditionFalse, me.Reason, msg, stateStalled)
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, me.Reason, "Plan", "%s", msg)
		return ctrl.Result{}, nil
	}

	hosts, err := r.selectedHosts(ctx, p)
	if err != nil {
		setState(p, metav1.ConditionFalse, "InvalidSelector", err.Error(), stateStalled)
		return ctrl.Result{}, nil //nolint:nilerr // only a spec change can mend it; the condition says why
	}
	var canary labels.Selector
	if c := p.Spec.Rollout.Canary; c != nil && c.Selector != nil {
		if canary, err = metav1.LabelSelectorAsSelector(c.Selector); err != nil {
			setState(p, metav1.ConditionFalse, "InvalidSelector", "canary selector: "+err.Error(), stateStalled)
			return ctrl.Result{}, nil //nolint:nilerr // only a spec change can mend it; the condition says why
		}
	}
	selected := map[string]bool{}
	for _, h := range hosts {
		selected[h.Name] = true
	}
	for host, gi := range instances {
		if selected[host] {
			continue
		}
		if gi.DeletionTimestamp.IsZero() {
			if err := r.Client.Delete(ctx, gi); client.IgnoreNotFound(err) != nil {
				return ctrl.Result{}, fmt.Errorf("delete instance %s: %w", gi.Name, err)
			}
			r.Recorder.Eventf(p, gi, corev1.EventTypeNormal, "InstanceDeleted", "Plan",
				"host %s no longer selected: removing %s", host, gi.Name)
		}
		delete(instances, host)
	}

	tmpl := profileSpec(p, &rel, mat)
	res, err := r.rollout(ctx, p, &rel, tmpl, hosts, canary, instances)
	failed := summarize(p, instances, &rel, tmpl.hashFor)
	p.Status.Desired = count32(len(hosts))
	setSummaryConditions(p, failed)
	return res, err
}

// selectedHosts lists the GatewayHosts the profile's nodeSelector matches, by name.
func (r *GatewayProfileReconciler) selectedHosts(ctx context.Context, p *v1.GatewayProfile) ([]v1.GatewayHost, error) {
	sel, err := metav1.LabelSelectorAsSelector(&p.Spec.NodeSelector)
	if err != nil {
		return nil, fmt.Errorf("nodeSelector: %w", err)
	}
	var list v1.GatewayHostList
	if err := r.Client.List(ctx, &list, client.MatchingLabelsSelector{Selector: sel}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	// A host being deleted is being decommissioned: it gets nothing new.
	hosts := make([]v1.GatewayHost, 0, len(list.Items))
	for _, h := range list.Items {
		if h.DeletionTimestamp.IsZero() {
			hosts = append(hosts, h)
		}
	}
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name < hosts[j].Name })
	return hosts, nil
}

// reconcileDelete removes every instance of a deleted profile and lets the profile go once
// every host has removed its unit (each agent removes its instance's finalizer; the host
// controller does it for a host whose GatewayHost was deleted). Until then the Ready condition
// names the hosts it waits for and how to let a lost one go.
func (r *GatewayProfileReconciler) reconcileDelete(ctx context.Context, p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance) (ctrl.Result, error) {
	for _, gi := range instances {
		if gi.DeletionTimestamp.IsZero() {
			if err := r.Client.Delete(ctx, gi); client.IgnoreNotFound(err) != nil {
				return ctrl.Result{}, err
			}
			r.Recorder.Eventf(p, gi, corev1.EventTypeNormal, "InstanceDeleted", "Delete",
				"profile deleted: removing %s from host %s", gi.Name, gi.Spec.Host)
		}
	}
	if len(instances) == 0 {
		if controllerutil.RemoveFinalizer(p, FinalizerProfileInstances) {
			return ctrl.Result{}, r.Client.Update(ctx, p)
		}
		return ctrl.Result{}, nil
	}
	// The instances' deletion, and a host's change of reachability or deletion, wake this
	// profile again.
	waiting, err := r.waitingFor(ctx, instances)
	if err != nil {
		return ctrl.Result{}, err
	}
	msg := waiting.message()
	said := ""
	if was := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady); was != nil {
		said = was.Message // setting the condition changes the entry in place
	}
	setState(p, metav1.ConditionFalse, "Terminating", msg, stateReconciling)
	if len(waiting.unreachable) > 0 && said != msg {
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "WaitingForHosts", "Delete", "%s", msg)
	}
	return ctrl.Result{}, nil
}

// hostsWaitedFor are the hosts a deleted profile still waits for, by what their state asks of
// a person.
type hostsWaitedFor struct {
	reachable, unreachable, gone []string
}

// waitingFor sorts the hosts of a deleted profile's remaining instances by reachability.
func (r *GatewayProfileReconciler) waitingFor(ctx context.Context, instances map[string]*v1.GatewayInstance) (hostsWaitedFor, error) {
	var w hostsWaitedFor
	for host := range instances {
		var h v1.GatewayHost
		err := r.Client.Get(ctx, client.ObjectKey{Name: host}, &h)
		switch {
		case apierrors.IsNotFound(err) || err == nil && !h.DeletionTimestamp.IsZero():
			w.gone = append(w.gone, host)
		case err != nil:
			return w, err
		case meta.IsStatusConditionFalse(h.Status.Conditions, v1.ConditionReachable):
			w.unreachable = append(w.unreachable, host)
		default:
			w.reachable = append(w.reachable, host)
		}
	}
	return w, nil
}

// message says which hosts a deletion waits for and, for unreachable ones, the way out.
func (w hostsWaitedFor) message() string {
	var parts []string
	if len(w.reachable) > 0 {
		parts = append(parts, fmt.Sprintf("%d host(s) removing the unit: %s", len(w.reachable), hostList(w.reachable)))
	}
	if len(w.gone) > 0 {
		parts = append(parts, fmt.Sprintf("%d deleted host(s) being released: %s", len(w.gone), hostList(w.gone)))
	}
	if len(w.unreachable) > 0 {
		first := append([]string(nil), w.unreachable...)
		sort.Strings(first)
		parts = append(parts, fmt.Sprintf("%d unreachable host(s), whose agents must remove the unit once back: %s; "+
			"if a machine is gone for good, delete its GatewayHost (kubectl delete gatewayhost %s) and its instances are released",
			len(w.unreachable), hostList(w.unreachable), first[0]))
	}
	return "deleting: waiting for " + strings.Join(parts, "; ")
}

// patchStatus writes the status with an optimistic lock: the rollout's state lives in it, and a
// decision taken on a stale copy must not overwrite a newer one.
func (r *GatewayProfileReconciler) patchStatus(ctx context.Context, base, p *v1.GatewayProfile) error {
	if equality.Semantic.DeepEqual(base.Status, p.Status) {
		return nil
	}
	return client.IgnoreNotFound(r.Client.Status().Patch(ctx, p, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})))
}

// hostList renders up to five names for a message.
func hostList(names []string) string {
	sort.Strings(names)
	if len(names) > 5 {
		return strings.Join(names[:5], ", ") + fmt.Sprintf(" and %d more", len(names)-5)
	}
	return strings.Join(names, ", ")
}
