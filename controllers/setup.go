package controllers

import (
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Options configure the controller manager's reconcilers.
type Options struct {
	// HostGracePeriod is how old a host's heartbeat may be before it counts as unreachable.
	HostGracePeriod time.Duration
	// HostLeaseNamespace holds the hosts' heartbeat Leases; empty: only the GatewayHosts'
	// status.lastHeartbeatTime counts.
	HostLeaseNamespace string
	// ToolRunRuntimeClass is the Kata RuntimeClass of tool-run Pods.
	ToolRunRuntimeClass string
	// ToolRunTTL is how long a finished tool run is kept.
	ToolRunTTL time.Duration
	// MaterialNamespace holds the Secrets and ConfigMaps profiles name, and each host's Role
	// and RoleBinding to read them. The manager's cache must cover Secrets, ConfigMaps, Roles and
	// RoleBindings of this namespace (MaterialCache says how).
	MaterialNamespace string
}

// DefaultMaterialNamespace is the operator's namespace in config/.
const DefaultMaterialNamespace = "gateway-operator-system"

// MaterialCache limits the manager's cache of Roles and RoleBindings to the material namespace,
// and of Secrets and ConfigMaps further to those labeled v1.MaterialLabel=true: the manager
// never holds another Secret in memory, nor can a profile make it read one.
func MaterialCache(ns string) map[client.Object]cache.ByObject {
	only := cache.ByObject{Namespaces: map[string]cache.Config{ns: {}}}
	labeled := cache.ByObject{Namespaces: map[string]cache.Config{ns: {
		LabelSelector: labels.SelectorFromSet(labels.Set{v1.MaterialLabel: "true"}),
	}}}
	return map[client.Object]cache.ByObject{
		&corev1.Secret{}: labeled, &corev1.ConfigMap{}: labeled, &rbacv1.Role{}: only, &rbacv1.RoleBinding{}: only,
	}
}

// Setup registers every reconciler with the manager.
func Setup(mgr ctrl.Manager, o Options) error {
	if err := indexFields(mgr); err != nil {
		return err
	}
	if err := (&ReleaseReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("release-controller")}).SetupWithManager(mgr); err != nil {
		return err
	}
	if err := (&GatewayHostReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: mgr.GetEventRecorder("gatewayhost-controller"),
		GracePeriod: o.HostGracePeriod, LeaseNamespace: o.HostLeaseNamespace}).SetupWithManager(mgr); err != nil {
		return err
	}
	if o.ToolRunRuntimeClass == "" {
		o.ToolRunRuntimeClass = "kata"
	}
	if o.ToolRunTTL == 0 {
		o.ToolRunTTL = time.Hour
	}
	if err := (&ToolRunReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder:     mgr.GetEventRecorder("toolrun-controller"),
		RuntimeClass: o.ToolRunRuntimeClass, TTL: o.ToolRunTTL}).SetupWithManager(mgr); err != nil {
		return err
	}
	if err := (&CSRApprover{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader()}).SetupWithManager(mgr); err != nil {
		return err
	}
	if o.MaterialNamespace == "" {
		o.MaterialNamespace = DefaultMaterialNamespace
	}
	if err := (&AgentAccessReconciler{Client: mgr.GetClient(), Namespace: o.MaterialNamespace}).SetupWithManager(mgr); err != nil {
		return err
	}
	return (&GatewayProfileReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("gatewayprofile-controller"),
		MaterialNamespace: o.MaterialNamespace}).SetupWithManager(mgr)
}
