package v1alpha1

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ToolRunNetworkMode says what network an untrusted tool run gets.
// +kubebuilder:validation:Enum=None;Allowlist
type ToolRunNetworkMode string

const (
	// ToolRunNetworkNone denies all traffic (the default).
	ToolRunNetworkNone ToolRunNetworkMode = "None"
	// ToolRunNetworkAllowlist allows egress to the listed destinations only.
	ToolRunNetworkAllowlist ToolRunNetworkMode = "Allowlist"
)

// ToolRunNetwork is the network policy of a tool run.
// +kubebuilder:validation:XValidation:rule="self.mode == 'Allowlist' || !has(self.allow) || size(self.allow) == 0",message="allow is only used when mode is Allowlist"
// +kubebuilder:validation:XValidation:rule="self.mode != 'Allowlist' || (has(self.allow) && size(self.allow) > 0)",message="mode Allowlist needs at least one allow entry"
type ToolRunNetwork struct {
	// Mode is None (no network at all, the default) or Allowlist.
	// +kubebuilder:default=None
	// +optional
	Mode ToolRunNetworkMode `json:"mode,omitempty"`

	// Allow lists the CIDRs the run may reach in Allowlist mode.
	// +listType=set
	// +kubebuilder:validation:MaxItems=32
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:items:XValidation:rule="isCIDR(self)",message="must be a CIDR, e.g. 10.0.0.0/8"
	// +optional
	Allow []string `json:"allow,omitempty"`
}

// ToolRunSpec is one untrusted execution. It never runs in a gateway: it runs in a Pod with a
// Kata Containers RuntimeClass, a microVM of its own.
type ToolRunSpec struct {
	// Profile is the GatewayProfile that asked for this run.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=26
	// +kubebuilder:validation:Pattern=`^[a-z]([-a-z0-9]*[a-z0-9])?$`
	Profile string `json:"profile"`

	// Image is the container image the tool runs in.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=512
	Image string `json:"image"`

	// Command overrides the image's entrypoint.
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=4096
	// +optional
	Command []string `json:"command,omitempty"`

	// Args are passed to the command.
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MaxLength=4096
	// +optional
	Args []string `json:"args,omitempty"`

	// Stdin is fed to the tool's standard input, at most 64 KiB.
	// +kubebuilder:validation:MaxLength=65536
	// +optional
	Stdin string `json:"stdin,omitempty"`

	// Resources of the run. Limits for cpu and memory are required: Kata sizes the microVM from
	// them.
	// +kubebuilder:validation:XValidation:rule="has(self.limits) && 'cpu' in self.limits && 'memory' in self.limits",message="resources.limits.cpu and resources.limits.memory are required: the microVM is sized from them"
	Resources corev1.ResourceRequirements `json:"resources"`

	// TimeoutSeconds bounds the run's wall-clock time; then it is killed and reported TimedOut.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=86400
	// +kubebuilder:default=300
	// +optional
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`

	// Network of the run: none by default.
	// +kubebuilder:default={mode: None}
	// +optional
	Network ToolRunNetwork `json:"network,omitempty"`
}

// ToolRunPhase is where a tool run is in its life.
// +kubebuilder:validation:Enum=Pending;Running;Succeeded;Failed;TimedOut;Rejected
type ToolRunPhase string

// ToolRun phases.
const (
	ToolRunPending   ToolRunPhase = "Pending"
	ToolRunRunning   ToolRunPhase = "Running"
	ToolRunSucceeded ToolRunPhase = "Succeeded"
	ToolRunFailed    ToolRunPhase = "Failed"
	ToolRunTimedOut  ToolRunPhase = "TimedOut"
	ToolRunRejected  ToolRunPhase = "Rejected"
)

// ToolRunStatus is the outcome of a tool run.
type ToolRunStatus struct {
	// ObservedGeneration is the generation this status was computed for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Phase of the run.
	// +optional
	Phase ToolRunPhase `json:"phase,omitempty"`

	// ExitCode of the tool, once it finished.
	// +optional
	ExitCode *int32 `json:"exitCode,omitempty"`

	// Output is the tool's output, cut to a bounded size.
	// +kubebuilder:validation:MaxLength=16384
	// +optional
	Output string `json:"output,omitempty"`

	// OutputTruncated is true when Output was cut.
	// +optional
	OutputTruncated bool `json:"outputTruncated,omitempty"`

	// PodName is the Pod running the tool.
	// +optional
	PodName string `json:"podName,omitempty"`

	// StartTime is when the tool started.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`

	// CompletionTime is when the tool finished.
	// +optional
	CompletionTime *metav1.Time `json:"completionTime,omitempty"`

	// Conditions, as a Job's: Complete (finished, exit 0) or Failed (non-zero exit, timed out
	// or rejected, with the reason); Reconciling while pending or running, Stalled once failed.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// ToolRun is one untrusted tool execution, run in its own Kata microVM Pod. Its name is at
// most 63 characters: it becomes the value of the gateway.agent.dev/toolrun label on the run's
// Pod, ConfigMap and NetworkPolicy (named trun-<name> and trun-<name>-stdin).
//
// +kubebuilder:object:root=true
// +kubebuilder:validation:XValidation:rule="size(self.metadata.name) <= 63",message="a ToolRun name is at most 63 characters: it becomes a label value of the run's Pod"
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=trun,categories=gateway
// +kubebuilder:printcolumn:name="Profile",type=string,JSONPath=`.spec.profile`
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Exit",type=integer,JSONPath=`.status.exitCode`
// +kubebuilder:printcolumn:name="Pod",type=string,JSONPath=`.status.podName`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ToolRun struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the run.
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="spec is immutable: create a new ToolRun"
	Spec ToolRunSpec `json:"spec"`

	// Status is written by the controller manager.
	// +optional
	Status ToolRunStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// ToolRunList is a list of ToolRuns.
type ToolRunList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ToolRun `json:"items"`
}

func init() {
	register(&ToolRun{}, &ToolRunList{})
}

// ToolRunRoute is where a gateway's tool-run request is executed.
// +kubebuilder:validation:Enum=Auto;Host;Cluster
type ToolRunRoute string

// Tool-run routes.
const (
	// ToolRunRouteAuto follows the host's --toolrun-route.
	ToolRunRouteAuto ToolRunRoute = "Auto"
	// ToolRunRouteHost runs every request in a microVM on the gateway's own host.
	ToolRunRouteHost ToolRunRoute = "Host"
	// ToolRunRouteCluster runs every request as a ToolRun the host's agent creates.
	ToolRunRouteCluster ToolRunRoute = "Cluster"
)

// MaxToolRunSlots bounds ToolRunSettings.ClusterSlots: a slot is a one-digit suffix of a
// ToolRun name.
const MaxToolRunSlots = 9

// ToolRunSettings are a profile's tool-run settings. A request on the gateway's socket says only
// the command, stdin and timeout; everything else a cluster run needs is stated here, where the
// gateway cannot change it.
// +kubebuilder:validation:XValidation:rule="!has(self.route) || self.route != 'Cluster' || has(self.image)",message="route Cluster needs an image: cluster runs are ToolRuns, which name one"
type ToolRunSettings struct {
	// Route is Auto (the default: the host's --toolrun-route decides), Host (a microVM on the
	// gateway's own host, refused where there is none) or Cluster (a ToolRun the host's agent
	// creates on the profile's behalf).
	// +kubebuilder:default=Auto
	// +optional
	Route ToolRunRoute `json:"route,omitempty"`

	// Image is the container image cluster runs use. Without it, no request of this profile goes
	// to the cluster.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=512
	// +optional
	Image string `json:"image,omitempty"`

	// Resources of each cluster run; default limits cpu 1 and memory 512Mi.
	// +kubebuilder:validation:XValidation:rule="has(self.limits) && 'cpu' in self.limits && 'memory' in self.limits",message="resources.limits.cpu and resources.limits.memory are required: the microVM is sized from them"
	// +optional
	Resources *corev1.ResourceRequirements `json:"resources,omitempty"`

	// ClusterSlots is how many cluster runs of this profile one host may hold at once, from 1 to
	// 9 (default 1). Each slot is a ToolRun name <profile>.<host>.<k> that only that host's agent
	// may create, read and delete.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=9
	// +kubebuilder:default=1
	// +optional
	ClusterSlots int32 `json:"clusterSlots,omitempty"`
}

// ToolRunSlot is the name of slot k of profile's cluster tool runs from host: the only names
// under which host's agent may create a ToolRun for profile. Empty when the name would not fit
// a ToolRun's 63 characters.
func ToolRunSlot(profile, host string, k int) string {
	n := profile + "." + host + "." + strconv.Itoa(k)
	if len(n) > 63 || k < 0 || k >= MaxToolRunSlots {
		return ""
	}
	return n
}

// ClusterResources are the resources of each of the profile's cluster runs: its Resources, else
// limits cpu 1 and memory 512Mi.
func (s *ToolRunSettings) ClusterResources() corev1.ResourceRequirements {
	if s != nil && s.Resources != nil {
		return *s.Resources.DeepCopy()
	}
	return corev1.ResourceRequirements{Limits: corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("512Mi"),
	}}
}

// Slots is how many cluster slots the settings give a host (0 without an image).
func (s *ToolRunSettings) Slots() int {
	if s == nil || s.Image == "" {
		return 0
	}
	return min(max(int(s.ClusterSlots), 1), MaxToolRunSlots)
}
