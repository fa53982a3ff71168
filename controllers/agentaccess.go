package controllers

import (
	"context"
	"fmt"
	"slices"
	"sort"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// The manager grants each agent identity read access to the Secrets and ConfigMaps its
// instances name, and nothing else, as the Kubernetes Node authorizer does for a kubelet.
// RBAC cannot express "the Secrets of the profiles selecting this host", so the grant is a Role
// per host with the exact names, rewritten whenever the host's instances change.

// AgentAccessPrefix starts the name of each host's Role and RoleBinding in the material
// namespace: gateway-agent-<host>. The admission policy gateway-manager-agent-access holds the
// manager to that form.
const AgentAccessPrefix = "gateway-agent-"

// AgentUserPrefix starts the user name of a bare-metal agent's client certificate.
const AgentUserPrefix = "system:gateway-agent:"

// AgentAccessReconciler keeps, per GatewayHost, the Role and RoleBinding that let its agent
// get the Secrets and ConfigMaps its instances name.
type AgentAccessReconciler struct {
	// Client reads from the manager's cache, which holds the Roles and RoleBindings of the
	// material namespace only.
	Client client.Client
	// Namespace is the material namespace.
	Namespace string
}

// SetupWithManager registers the reconciler: a host is reconciled when it appears or goes,
// when one of its instances is created, deleted or changes its spec, and when someone changes
// or removes its Role or RoleBinding.
func (r *AgentAccessReconciler) SetupWithManager(mgr ctrl.Manager) error {
	toHost := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: client.ObjectKey{Name: o.(*v1.GatewayInstance).Spec.Host}}}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("agentaccess").
		For(&v1.GatewayHost{}, builder.WithPredicates(predicate.Funcs{
			UpdateFunc: func(e event.UpdateEvent) bool {
				return e.ObjectOld.GetDeletionTimestamp().IsZero() != e.ObjectNew.GetDeletionTimestamp().IsZero()
			},
		})).
		Watches(&v1.GatewayInstance{}, toHost, builder.WithPredicates(predicate.Funcs{
			UpdateFunc: func(e event.UpdateEvent) bool {
				o, n := e.ObjectOld.(*v1.GatewayInstance), e.ObjectNew.(*v1.GatewayInstance)
				return !equality.Semantic.DeepEqual(o.Spec.Material, n.Spec.Material) ||
					!equality.Semantic.DeepEqual(o.Spec.GatewaySettings, n.Spec.GatewaySettings) ||
					o.DeletionTimestamp.IsZero() != n.DeletionTimestamp.IsZero()
			},
		})).
		Watches(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.hostsNaming(true))).
		Watches(&corev1.ConfigMap{}, handler.EnqueueRequestsFromMapFunc(r.hostsNaming(false))).
		Owns(&rbacv1.Role{}).
		Owns(&rbacv1.RoleBinding{}).
		Complete(r)
}

// hostsNaming maps a Secret (secret true) or ConfigMap of the material namespace to the hosts
// whose instances name it, so that labeling or unlabeling it changes their grants.
func (r *AgentAccessReconciler) hostsNaming(secret bool) handler.MapFunc {
	return func(ctx context.Context, o client.Object) []reconcile.Request {
		if o.GetNamespace() != r.Namespace {
			return nil
		}
		var list v1.GatewayInstanceList
		if err := r.Client.List(ctx, &list, client.UnsafeDisableDeepCopy); err != nil {
			return nil
		}
		var reqs []reconcile.Request
		for i := range list.Items {
			gi := &list.Items[i]
			s, c := gi.Spec.MaterialRefs()
			names := c
			if secret {
				names = s
			}
			if slices.Contains(names, o.GetName()) {
				reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKey{Name: gi.Spec.Host}})
			}
		}
		return reqs
	}
}

// labeled keeps the names whose object exists in the material namespace and carries
// v1.MaterialLabel: the grant never names another object, whatever an instance says.
func (r *AgentAccessReconciler) labeled(ctx context.Context, names []string, obj func() client.Object) ([]string, error) {
	var keep []string
	for _, n := range names {
		o := obj()
		err := r.Client.Get(ctx, client.ObjectKey{Namespace: r.Namespace, Name: n}, o)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return nil, err
		case v1.MaterialLabeled(o):
			keep = append(keep, n)
		}
	}
	return keep, nil
}

// Reconcile writes the host's Role and RoleBinding, or removes them when the host needs
// nothing or is gone.
func (r *AgentAccessReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var h v1.GatewayHost
	err := r.Client.Get(ctx, req.NamespacedName, &h)
	if client.IgnoreNotFound(err) != nil {
		return ctrl.Result{}, err
	}
	if apierrors.IsNotFound(err) || !h.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, r.revoke(ctx, req.Name)
	}
	var list v1.GatewayInstanceList
	if err := r.Client.List(ctx, &list, client.MatchingFields{indexInstanceHost: h.Name}, client.UnsafeDisableDeepCopy); err != nil {
		return ctrl.Result{}, err
	}
	secrets, configMaps := hostMaterial(list.Items, r.Namespace)
	if secrets, err = r.labeled(ctx, secrets, func() client.Object { return &corev1.Secret{} }); err != nil {
		return ctrl.Result{}, err
	}
	if configMaps, err = r.labeled(ctx, configMaps, func() client.Object { return &corev1.ConfigMap{} }); err != nil {
		return ctrl.Result{}, err
	}
	role := AgentRole(&h, r.Namespace, secrets, configMaps, hostToolRunSlots(list.Items, h.Name))
	if role == nil {
		return ctrl.Result{}, r.revoke(ctx, h.Name)
	}
	if err := r.write(ctx, role, func(cur client.Object) bool {
		c := cur.(*rbacv1.Role)
		same := equality.Semantic.DeepEqual(c.Rules, role.Rules)
		c.Rules = role.Rules
		return !same
	}, nil); err != nil {
		return ctrl.Result{}, err
	}
	binding := AgentRoleBinding(&h, r.Namespace)
	return ctrl.Result{}, r.write(ctx, binding, func(cur client.Object) bool {
		c := cur.(*rbacv1.RoleBinding)
		same := equality.Semantic.DeepEqual(c.Subjects, binding.Subjects)
		c.Subjects = binding.Subjects
		return !same
	}, func(cur client.Object) bool {
		// roleRef cannot be changed in place: a binding to another role is replaced.
		return cur.(*rbacv1.RoleBinding).RoleRef != binding.RoleRef
	})
}

// hostMaterial lists the Secrets and ConfigMaps that the host's live instances name in ns.
// An instance being deleted needs none: its agent only stops the gateway. Nor does one whose
// isolation may not carry material.
func hostMaterial(instances []v1.GatewayInstance, ns string) (secrets, configMaps []string) {
	for i := range instances {
		gi := &instances[i]
		if !gi.DeletionTimestamp.IsZero() || gi.Spec.Material == nil || gi.Spec.Material.Namespace != ns ||
			gi.Spec.ValidateMaterialIsolation() != nil {
			continue
		}
		s, c := gi.Spec.MaterialRefs()
		secrets = append(secrets, s...)
		configMaps = append(configMaps, c...)
	}
	sort.Strings(secrets)
	sort.Strings(configMaps)
	return slices.Compact(secrets), slices.Compact(configMaps)
}

// hostToolRunSlots lists the ToolRun names under which the host's agent may run its live
// instances' cluster tool runs: ClusterSlots per profile that names an image.
func hostToolRunSlots(instances []v1.GatewayInstance, host string) []string {
	var slots []string
	for i := range instances {
		gi := &instances[i]
		if !gi.DeletionTimestamp.IsZero() || gi.Spec.Host != host {
			continue
		}
		for k := range gi.Spec.ToolRuns.Slots() {
			if n := v1.ToolRunSlot(gi.Spec.Profile, host, k); n != "" {
				slots = append(slots, n)
			}
		}
	}
	sort.Strings(slots)
	return slices.Compact(slots)
}

// AgentRole is the Role that lets host h's agent get exactly the named Secrets and ConfigMaps
// of ns, and get, watch and delete its ToolRun slots there (creating under a slot name is
// allowed by the gateway-agent-own-host policy only to whoever may get it). Nil when it needs
// none (a rule without resourceNames would grant every object). The GatewayHost owns it, so the
// garbage collector removes it with the host.
func AgentRole(h *v1.GatewayHost, ns string, secrets, configMaps, toolRunSlots []string) *rbacv1.Role {
	var rules []rbacv1.PolicyRule
	if len(toolRunSlots) > 0 {
		rules = append(rules, rbacv1.PolicyRule{APIGroups: []string{v1.GroupVersion.Group}, Resources: []string{"toolruns"},
			Verbs: []string{"get", "watch", "delete"}, ResourceNames: toolRunSlots})
	}
	if len(secrets) > 0 {
		rules = append(rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"},
			Verbs: []string{"get"}, ResourceNames: secrets})
	}
	if len(configMaps) > 0 {
		rules = append(rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"configmaps"},
			Verbs: []string{"get"}, ResourceNames: configMaps})
	}
	if len(rules) == 0 {
		return nil
	}
	return &rbacv1.Role{ObjectMeta: accessMeta(h, ns), Rules: rules}
}

// AgentRoleBinding binds host h's Role to its agent's user, and to no one else.
func AgentRoleBinding(h *v1.GatewayHost, ns string) *rbacv1.RoleBinding {
	return &rbacv1.RoleBinding{
		ObjectMeta: accessMeta(h, ns),
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: AgentUserPrefix + h.Name}},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: AgentAccessPrefix + h.Name},
	}
}

func accessMeta(h *v1.GatewayHost, ns string) metav1.ObjectMeta {
	return metav1.ObjectMeta{
		Name: AgentAccessPrefix + h.Name, Namespace: ns,
		Labels: map[string]string{v1.LabelHost: h.Name},
		OwnerReferences: []metav1.OwnerReference{{APIVersion: v1.GroupVersion.String(), Kind: "GatewayHost",
			Name: h.Name, UID: h.UID, Controller: ptrBool(true)}},
	}
}

// write creates want, or updates the existing object when mutate says it changed it. An
// object of that name owned by another host (a host deleted and created again), or one that
// replace (when set) says cannot be updated into want, is deleted and created anew.
func (r *AgentAccessReconciler) write(ctx context.Context, want client.Object, mutate, replace func(client.Object) bool) error {
	cur := want.DeepCopyObject().(client.Object)
	err := r.Client.Get(ctx, client.ObjectKeyFromObject(want), cur)
	if apierrors.IsNotFound(err) {
		return client.IgnoreAlreadyExists(r.Client.Create(ctx, want.DeepCopyObject().(client.Object)))
	}
	if err != nil {
		return err
	}
	if !equality.Semantic.DeepEqual(cur.GetOwnerReferences(), want.GetOwnerReferences()) || (replace != nil && replace(cur)) {
		if err := r.Client.Delete(ctx, cur, client.Preconditions{UID: ptrUID(cur)}); client.IgnoreNotFound(err) != nil {
			return err
		}
		return r.Client.Create(ctx, want.DeepCopyObject().(client.Object))
	}
	if mutate(cur) {
		return r.Client.Update(ctx, cur)
	}
	return nil
}

// revoke removes the host's Role and RoleBinding, if the cache holds them; the Role first, so
// access ends at once.
func (r *AgentAccessReconciler) revoke(ctx context.Context, host string) error {
	key := client.ObjectKey{Name: AgentAccessPrefix + host, Namespace: r.Namespace}
	for _, o := range []client.Object{&rbacv1.Role{}, &rbacv1.RoleBinding{}} {
		if err := r.Client.Get(ctx, key, o); apierrors.IsNotFound(err) {
			continue
		} else if err != nil {
			return err
		}
		if err := r.Client.Delete(ctx, o); client.IgnoreNotFound(err) != nil {
			return fmt.Errorf("revoke %s: %w", key.Name, err)
		}
	}
	return nil
}

func ptrUID(o client.Object) *types.UID {
	u := o.GetUID()
	return &u
}
