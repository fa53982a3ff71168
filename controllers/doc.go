// Package controllers holds the cluster-side reconcilers of the controller manager: Release,
// GatewayHost, GatewayProfile and ToolRun. They only read and write API objects; hosts are
// changed by their node agents alone.
package controllers

// The manager's permissions, from which config/rbac/role.yaml is generated. ConfigMaps and
// NetworkPolicies are read by name only (never listed or watched), leases only as leader election
// does; config/policies/manager_policy.yaml narrows pods, ConfigMaps and NetworkPolicies further
// to the objects of ToolRuns.
//
// +kubebuilder:rbac:groups=gateway.agent.dev,resources=releases;gatewayhosts;gatewayprofiles;gatewayinstances;toolruns,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=gateway.agent.dev,resources=releases/status;gatewayhosts/status;gatewayprofiles/status;toolruns/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=gateway.agent.dev,resources=releases/finalizers;gatewayprofiles/finalizers;toolruns/finalizers,verbs=update
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch;create;delete
// +kubebuilder:rbac:groups="",resources=configmaps,verbs=get;create;delete
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=networking.k8s.io,resources=networkpolicies,verbs=get;create;delete
// +kubebuilder:rbac:groups=node.k8s.io,resources=runtimeclasses,verbs=get;list;watch
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;create;update
// +kubebuilder:rbac:groups="",namespace=gateway-operator-system,resources=secrets;configmaps,verbs=get;list;watch
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,namespace=gateway-operator-system,resources=roles;rolebindings,verbs=get;list;watch;create;update;delete
