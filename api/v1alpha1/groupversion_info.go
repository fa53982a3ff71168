// Package v1alpha1 is the gateway.agent.dev/v1alpha1 API: the contract between the people who
// declare which agent runtime runs where (Release, GatewayProfile), the controller manager that
// plans it (GatewayInstance) and the node agents that apply it to systemd on each host
// (GatewayHost, GatewayInstance status). ToolRun is the Tier-2 path for untrusted tool code.
//
// +kubebuilder:object:generate=true
// +groupName=gateway.agent.dev
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of every kind in this package.
	GroupVersion = schema.GroupVersion{Group: "gateway.agent.dev", Version: "v1alpha1"}

	// SchemeBuilder registers the kinds of this package with a runtime.Scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(func(s *runtime.Scheme) error {
		metav1.AddToGroupVersion(s, GroupVersion)
		return nil
	})

	// AddToScheme adds the kinds of this package to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// register adds kinds of this package to SchemeBuilder; each kind's file calls it from init.
func register(objects ...runtime.Object) {
	SchemeBuilder.Register(func(s *runtime.Scheme) error {
		s.AddKnownTypes(GroupVersion, objects...)
		return nil
	})
}
