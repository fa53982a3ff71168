package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// GatewayHostSpec is what a person may set on a host. The host's labels (metadata.labels) are
// what GatewayProfiles select on: an administrator sets them. The host's agent may set only
// labels under reported.gateway.agent.dev/ (facts it reports about itself, which a compromised
// host can forge: never select on them to decide where code or secrets go).
type GatewayHostSpec struct {
	// Unschedulable keeps rollouts away from this host: instances already here keep running,
	// but no new release is moved onto it. Like `kubectl cordon` for a Node.
	// +optional
	Unschedulable bool `json:"unschedulable,omitempty"`
}

// HostCapabilities are what a host can offer beyond running gateways.
type HostCapabilities struct {
	// KVM is true when the node agent (root) can open /dev/kvm for reading and writing. It
	// does not say that a guest boots under it (nested virtualization may refuse): see
	// MicroVMAcceleration for what the agent's own microVMs use.
	// +optional
	KVM bool `json:"kvm,omitempty"`

	// Kata is true when a Kata Containers shim (containerd-shim-kata-v2) is installed on the
	// host, in /usr/bin, /usr/local/bin or /opt/kata/bin.
	// +optional
	Kata bool `json:"kata,omitempty"`

	// MicroVM is true when the node agent serves host-local microVM tool runs (its
	// --microvm-guest is set and the runner started).
	// +optional
	MicroVM bool `json:"microVM,omitempty"`

	// MicroVMAcceleration is what the agent's tool-run microVMs run under, when MicroVM is
	// true: KVM, or TCG (QEMU's software emulation, several times slower to boot). With
	// --microvm-accel=auto it is TCG until a probe VM has booted under KVM.
	// +optional
	MicroVMAcceleration MicroVMAcceleration `json:"microVMAcceleration,omitempty"`

	// MicroVMAccelerationReason says in one sentence why MicroVMAcceleration is what it is,
	// e.g. "no /dev/kvm on the host" or why the probe boot under KVM did not complete.
	// +kubebuilder:validation:MaxLength=256
	// +optional
	MicroVMAccelerationReason string `json:"microVMAccelerationReason,omitempty"`
}

// MicroVMAcceleration is how QEMU runs a host's microVMs.
// +kubebuilder:validation:Enum=KVM;TCG
type MicroVMAcceleration string

const (
	// AccelerationKVM runs guests with the host CPU's virtualization (/dev/kvm).
	AccelerationKVM MicroVMAcceleration = "KVM"
	// AccelerationTCG runs guests under QEMU's software emulation.
	AccelerationTCG MicroVMAcceleration = "TCG"
)

// MaxAccelerationReasonLength bounds HostCapabilities.MicroVMAccelerationReason.
const MaxAccelerationReasonLength = 256

// GatewayHostStatus is written by the host's node agent (and the Reachable condition by the
// controller manager).
type GatewayHostStatus struct {
	// ObservedGeneration is the generation this status was computed for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// AgentVersion is the version of the node agent running on the host.
	// +kubebuilder:validation:MaxLength=128
	// +optional
	AgentVersion string `json:"agentVersion,omitempty"`

	// SystemdVersion is the version of systemd the agent drives, e.g. "252".
	// +kubebuilder:validation:MaxLength=128
	// +optional
	SystemdVersion string `json:"systemdVersion,omitempty"`

	// Capabilities of the host.
	// +optional
	Capabilities HostCapabilities `json:"capabilities,omitempty"`

	// AgentID names the running agent process that wrote the last heartbeat (random per start):
	// two agents writing under one host identity (a cloned machine) show as two IDs taking turns.
	// +kubebuilder:validation:MaxLength=64
	// +optional
	AgentID string `json:"agentID,omitempty"`

	// LastHeartbeatTime is when the agent last reported in. A heartbeat older than the
	// manager's grace period marks the host Unreachable.
	// +optional
	LastHeartbeatTime *metav1.Time `json:"lastHeartbeatTime,omitempty"`

	// Conditions: Ready (the agent runs and reaches systemd), Reachable (heartbeat is fresh),
	// StagingSpace (a gateway that fills its home cannot keep the agent from staging a release:
	// the releases' filesystem keeps space only root may use, or homes live elsewhere),
	// DuplicateAgent (True while another agent heart-beats under this host's identity; both
	// stop applying until it is resolved).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// GatewayHost is one bare-metal host that runs gateways, registered by its node agent.
// Its name is the host name, a DNS label.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=gwh,categories=gateway
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",message="metadata.name: a host name must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Reachable",type=string,JSONPath=`.status.conditions[?(@.type=="Reachable")].status`
// +kubebuilder:printcolumn:name="Agent",type=string,JSONPath=`.status.agentVersion`
// +kubebuilder:printcolumn:name="Systemd",type=string,JSONPath=`.status.systemdVersion`,priority=1
// +kubebuilder:printcolumn:name="MicroVM",type=string,JSONPath=`.status.capabilities.microVMAcceleration`,priority=1
// +kubebuilder:printcolumn:name="Heartbeat",type=date,JSONPath=`.status.lastHeartbeatTime`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type GatewayHost struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is what a person may set on the host.
	// +optional
	Spec GatewayHostSpec `json:"spec,omitempty"`

	// Status is written by the host's agent.
	// +optional
	Status GatewayHostStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// GatewayHostList is a list of GatewayHosts.
type GatewayHostList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []GatewayHost `json:"items"`
}

func init() {
	register(&GatewayHost{}, &GatewayHostList{})
}
