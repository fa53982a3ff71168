package v1alpha1

import (
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// GatewaySettings is how one profile's gateway process runs on a host. A GatewayProfile states
// it once; the controller copies it into each of the profile's GatewayInstances.
type GatewaySettings struct {
	// Mode is how the launcher starts the gateway: `cli` runs
	// `python -m agent_cli.main gateway run --replace`; `script` runs `python <exec>`.
	// +kubebuilder:default=cli
	// +optional
	Mode EntrypointMode `json:"mode,omitempty"`

	// Exec is the script run in `script` mode: a path relative to the release's root folder,
	// e.g. "gateways/mcp.py". Required in `script` mode, forbidden in `cli` mode.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=255
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9_][A-Za-z0-9_./-]*$`
	// +kubebuilder:validation:XValidation:rule="!self.contains('..') && !self.contains('//')",message="exec must stay inside the release: no '..' and no empty path segments"
	// +optional
	Exec string `json:"exec,omitempty"`

	// Isolation is how strongly this profile is kept apart from its siblings on the host.
	// `Production` (the default) runs it as its own user `agent-<profile>` under a hardened unit;
	// `Convenience` runs every profile as one shared user and never reports Isolated.
	// +kubebuilder:default=Production
	// +optional
	Isolation IsolationMode `json:"isolation,omitempty"`

	// Env adds variables to the profile's environment file. Names starting with AGENT_, PYTHON
	// or LD_ are reserved: the runtime path and identity are set by the agent alone.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=128
	// +optional
	Env []EnvVar `json:"env,omitempty"`

	// EnvFrom adds every key of a Secret in the operator's namespace as a variable, after the
	// profile's env. A name set twice is refused.
	// +kubebuilder:validation:MaxItems=16
	// +optional
	EnvFrom []EnvFromSource `json:"envFrom,omitempty"`

	// Files are written under the profile's home before the gateway starts, from Secrets or
	// ConfigMaps in the operator's namespace. Only the hosts that run the profile may read them.
	// +listType=map
	// +listMapKey=path
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Files []FileSource `json:"files,omitempty"`

	// EgressAllowlist lists the destinations a Production-isolated gateway may reach; all other
	// IP traffic is denied (systemd IPAddressDeny=any). Each entry is an IP address, a CIDR or one
	// of localhost, link-local, multicast. Ignored, and reported so, in Convenience mode.
	// +listType=set
	// +kubebuilder:validation:MaxItems=64
	// +optional
	EgressAllowlist []EgressRule `json:"egressAllowlist,omitempty"`

	// DeniedTools names tools this gateway must not load. The agent proves from the gateway's
	// status endpoint that none of them is loaded.
	// +listType=set
	// +kubebuilder:validation:MaxItems=256
	// +kubebuilder:validation:items:MaxLength=128
	// +kubebuilder:validation:items:Pattern=`^[A-Za-z0-9_][A-Za-z0-9_.:-]*$`
	// +optional
	DeniedTools []string `json:"deniedTools,omitempty"`

	// HomeRetention says what happens to the profile's home folder on a host when the profile
	// leaves that host: `Retain` (the default) keeps it, `Purge` deletes it.
	// +kubebuilder:default=Retain
	// +optional
	HomeRetention HomeRetention `json:"homeRetention,omitempty"`

	// Drift says what the agent does when something it rendered on a host changes behind its
	// back (an env file, a drop-in, `current`, the unit's state): `Heal` (the default) puts back
	// what was rendered, restarting the gateway only if the running process could see the
	// change, then proves it again; `Report` leaves the host as found and reports it.
	// +kubebuilder:default=Heal
	// +optional
	Drift DriftPolicy `json:"drift,omitempty"`

	// Resources caps the memory and tasks of the gateway on each host, in both isolation modes,
	// so that one gateway cannot starve its siblings or the node agent. Default: memoryMax 1Gi,
	// tasksMax 512.
	// +kubebuilder:default={}
	// +optional
	Resources GatewayResources `json:"resources,omitempty"`

	// ToolRuns says where the untrusted tool code this profile's gateway sends on its tool-run
	// socket runs, and what a run in the cluster gets. Unset: the host's route, and no cluster
	// runs (they need an image).
	// +optional
	ToolRuns *ToolRunSettings `json:"toolRuns,omitempty"`
}

// GatewayResources caps what one gateway's processes may use together on a host. systemd
// enforces it on the profile's unit; changing it restarts the gateway, like any other setting.
type GatewayResources struct {
	// MemoryMax is the most memory the gateway's processes may use together (systemd
	// MemoryMax=; swap is off for the unit, MemorySwapMax=0). Past it the kernel kills the
	// gateway and systemd restarts it. From 64Mi to 64Gi; default 1Gi.
	// +kubebuilder:default="1Gi"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity('64Mi')) >= 0 && quantity(string(self)).compareTo(quantity('64Gi')) <= 0",message="memoryMax must be from 64Mi to 64Gi"
	// +optional
	MemoryMax *resource.Quantity `json:"memoryMax,omitempty"`

	// TasksMax is the most processes and threads the gateway may have at once (systemd
	// TasksMax=); past it fork and thread creation fail. From 16 to 65536; default 512.
	// +kubebuilder:validation:Minimum=16
	// +kubebuilder:validation:Maximum=65536
	// +kubebuilder:default=512
	// +optional
	TasksMax int32 `json:"tasksMax,omitempty"`
}

// Defaults and bounds of GatewayResources, as the CRD schema states them. The node agent applies
// the defaults to a field that is unset and checks the bounds again before rendering a unit.
const (
	DefaultGatewayMemoryMax = "1Gi"
	MinGatewayMemoryMax     = "64Mi"
	MaxGatewayMemoryMax     = "64Gi"
	DefaultGatewayTasksMax  = 512
	MinGatewayTasksMax      = 16
	MaxGatewayTasksMax      = 65536
)

// GatewayProfileSpec is which release runs as this profile, and on which hosts.
// +kubebuilder:validation:XValidation:rule="self.mode != 'script' || has(self.exec)",message="exec is required when mode is script",fieldPath=".exec"
// +kubebuilder:validation:XValidation:rule="self.mode == 'script' || !has(self.exec)",message="exec is only allowed when mode is script",fieldPath=".exec"
// +kubebuilder:validation:XValidation:rule="!has(self.isolation) || self.isolation != 'Convenience' || ((!has(self.envFrom) || size(self.envFrom) == 0) && (!has(self.files) || size(self.files) == 0) && (!has(self.env) || self.env.all(e, !has(e.valueFrom))))",message="isolation Convenience runs every profile as one shared user that can read the others' files and environment: env valueFrom, envFrom and files need isolation Production"
type GatewayProfileSpec struct {
	// Release is the name of the Release this profile runs.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Release string `json:"release"`

	// NodeSelector selects the GatewayHosts (by their labels) that run this profile.
	// An empty selector ({}) selects every host.
	NodeSelector metav1.LabelSelector `json:"nodeSelector"`

	GatewaySettings `json:",inline"`

	// Rollout says how a new release or setting moves across the selected hosts.
	// +kubebuilder:default={}
	// +optional
	Rollout RolloutStrategy `json:"rollout,omitempty"`
}

// RolloutStrategy paces a change across the fleet. Hosts move in a stable order (a hash of host,
// profile and target release), at most maxUnavailable at a time, optionally after a canary step.
// Operator actions are annotations on the profile: gateway.agent.dev/promote (end a canary
// pause), gateway.agent.dev/resume (continue after a halt), gateway.agent.dev/abort (return every
// moved host to the previous release).
// +kubebuilder:validation:XValidation:rule="!has(self.maxUnavailable) || (type(self.maxUnavailable) == int ? self.maxUnavailable > 0 : self.maxUnavailable.matches('^([1-9][0-9]?|100)%$'))",message="maxUnavailable must be a positive number of hosts or a percentage from 1% to 100%",fieldPath=".maxUnavailable"
type RolloutStrategy struct {
	// MaxUnavailable is how many selected hosts may be moving, unreachable or failing at once: a
	// number, or a percentage of the selected hosts (rounded down, at least 1). Default 1.
	// +kubebuilder:validation:XIntOrString
	// +kubebuilder:default=1
	// +optional
	MaxUnavailable *intstr.IntOrString `json:"maxUnavailable,omitempty"`

	// Canary moves some hosts first, then pauses.
	// +optional
	Canary *CanaryStep `json:"canary,omitempty"`

	// Paused stops the rollout where it is: no further host is moved until it is false again.
	// +optional
	Paused bool `json:"paused,omitempty"`

	// ProgressDeadlineSeconds is how long one host may take to become aligned after it was
	// moved; past it the host counts as failed and the rollout halts. Default 600.
	// +kubebuilder:validation:Minimum=10
	// +kubebuilder:default=600
	// +optional
	ProgressDeadlineSeconds int32 `json:"progressDeadlineSeconds,omitempty"`

	// MinReadySeconds is how long a host must stay aligned before it counts as available.
	// +kubebuilder:validation:Minimum=0
	// +optional
	MinReadySeconds int32 `json:"minReadySeconds,omitempty"`

	// AutoRollback returns a failed host to its last good release (the agent does it on the
	// host). Default true.
	// +kubebuilder:default=true
	// +optional
	AutoRollback *bool `json:"autoRollback,omitempty"`

	// HealthProbe asks each host's agent to keep probing the gateway's status endpoint after
	// its proof, before the host counts as updated: a gateway that starts and then dies is
	// caught on the host that moved, not after the rollout went on.
	// +optional
	HealthProbe *HealthProbe `json:"healthProbe,omitempty"`
}

// HealthProbe is a probe of a gateway's status endpoint, in addition to the alignment proof.
type HealthProbe struct {
	// PeriodSeconds between two probes. Default 1.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=60
	// +kubebuilder:default=1
	// +optional
	PeriodSeconds int32 `json:"periodSeconds,omitempty"`

	// SuccessThreshold is how many probes in a row must find the same process answering with
	// the intended release. Default 3.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	// +kubebuilder:default=3
	// +optional
	SuccessThreshold int32 `json:"successThreshold,omitempty"`
}

// CanaryStep is the first step of a rollout: some hosts move, then the rollout pauses.
// +kubebuilder:validation:XValidation:rule="has(self.hosts) != has(self.selector)",message="set exactly one of hosts and selector"
// +kubebuilder:validation:XValidation:rule="!has(self.hosts) || (type(self.hosts) == int ? self.hosts > 0 : self.hosts.matches('^([1-9][0-9]?|100)%$'))",message="canary hosts must be a positive number or a percentage from 1% to 100%",fieldPath=".hosts"
type CanaryStep struct {
	// Hosts is how many selected hosts move first: a number or a percentage (rounded down, at
	// least 1).
	// +kubebuilder:validation:XIntOrString
	// +optional
	Hosts *intstr.IntOrString `json:"hosts,omitempty"`

	// Selector picks the canary hosts by label instead.
	// +optional
	Selector *metav1.LabelSelector `json:"selector,omitempty"`

	// PauseSeconds is how long to wait after the canary hosts are aligned before the rest
	// moves. Unset: wait until a person promotes (annotation gateway.agent.dev/promote).
	// +kubebuilder:validation:Minimum=0
	// +optional
	PauseSeconds *int32 `json:"pauseSeconds,omitempty"`
}

// RolloutPhase is where a rollout stands.
// +kubebuilder:validation:Enum=Progressing;Paused;Halted;Complete;Aborted
type RolloutPhase string

// Rollout phases.
const (
	RolloutProgressing RolloutPhase = "Progressing"
	RolloutPaused      RolloutPhase = "Paused"
	RolloutHalted      RolloutPhase = "Halted"
	RolloutComplete    RolloutPhase = "Complete"
	RolloutAborted     RolloutPhase = "Aborted"
)

// RolloutStatus is the state of the current rollout.
type RolloutStatus struct {
	// Phase of the rollout.
	// +optional
	Phase RolloutPhase `json:"phase,omitempty"`
	// Step says in words where the rollout is, e.g. "canary: 2 of 2 hosts aligned, paused".
	// +optional
	Step string `json:"step,omitempty"`
	// From is the release the rollout moves away from.
	// +optional
	From *ReleaseSummary `json:"from,omitempty"`
	// To is the release the rollout moves to.
	// +optional
	To *ReleaseSummary `json:"to,omitempty"`
	// StartTime is when the rollout began.
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// PauseTime is when the canary pause began.
	// +optional
	PauseTime *metav1.Time `json:"pauseTime,omitempty"`
	// Promoted is true once the canary pause has ended (by time or by a person).
	// +optional
	Promoted bool `json:"promoted,omitempty"`
	// Key identifies the target of this rollout: a digest of the release and settings.
	// +optional
	Key string `json:"key,omitempty"`
	// UpdatedHosts, PendingHosts and FailedHosts count the selected hosts by state.
	// +optional
	UpdatedHosts int32 `json:"updatedHosts"`
	// +optional
	PendingHosts int32 `json:"pendingHosts"`
	// +optional
	FailedHosts int32 `json:"failedHosts"`
	// Failed names up to ten failed hosts and why.
	// +optional
	Failed []string `json:"failed,omitempty"`
}

// RolloutRecord is one finished rollout.
type RolloutRecord struct {
	From *ReleaseSummary `json:"from,omitempty"`
	To   *ReleaseSummary `json:"to,omitempty"`
	// +optional
	StartTime *metav1.Time `json:"startTime,omitempty"`
	// +optional
	EndTime *metav1.Time `json:"endTime,omitempty"`
	// Result is Complete, Aborted or Superseded.
	Result string `json:"result"`
}

// ReleaseSummary names a release in a status.
type ReleaseSummary struct {
	// Name of the Release.
	// +optional
	Name string `json:"name,omitempty"`
	// Label of the release.
	// +optional
	Label string `json:"label,omitempty"`
	// SHA256 of the release tarball.
	// +optional
	SHA256 string `json:"sha256,omitempty"`
}

// GatewayProfileStatus is the fleet-wide state of one profile.
type GatewayProfileStatus struct {
	// ObservedGeneration is the generation this status was computed for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Desired is the number of hosts selected by the profile.
	// +kubebuilder:default=0
	// +optional
	Desired int32 `json:"desired"`

	// Updated is the number of hosts whose instance asks for the target release.
	// +kubebuilder:default=0
	// +optional
	Updated int32 `json:"updated"`

	// Aligned is the number of hosts proven to run the target release.
	// +kubebuilder:default=0
	// +optional
	Aligned int32 `json:"aligned"`

	// Degraded is the number of hosts whose instance reports Degraded.
	// +kubebuilder:default=0
	// +optional
	Degraded int32 `json:"degraded"`

	// CurrentRelease is the release every selected host was last proven to run.
	// +optional
	CurrentRelease *ReleaseSummary `json:"currentRelease,omitempty"`

	// TargetRelease is the release being rolled out.
	// +optional
	TargetRelease *ReleaseSummary `json:"targetRelease,omitempty"`

	// Rollout is the state of the current rollout.
	// +optional
	Rollout *RolloutStatus `json:"rollout,omitempty"`

	// History lists the last rollouts, newest first (at most 10).
	// +kubebuilder:validation:MaxItems=10
	// +optional
	History []RolloutRecord `json:"history,omitempty"`

	// Material is the secret and configuration material the profile rolls out now: its digest
	// and the resourceVersion of each Secret and ConfigMap it was read from. After changing a
	// Secret, wait until its resourceVersion shows here, then for Ready (docs/rollouts.md).
	// +optional
	Material *ProfileMaterial `json:"material,omitempty"`

	// LastHandled records the last request token of each operator action the controller
	// acted on (see the gateway.agent.dev/promote, resume and abort annotations).
	// +optional
	LastHandled *HandledRequests `json:"lastHandled,omitempty"`

	// Conditions: Ready (every selected host proven on the target), Reconciling (a rollout
	// moves or waits for hosts), Stalled (it cannot go on without a person: halted, aborted,
	// missing release, invalid selector), Progressing, Degraded, Paused.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// ProfileMaterial is what a profile's instances carry of its Secrets and ConfigMaps: never a
// value.
type ProfileMaterial struct {
	// Digest is the digest every selected host's instance carries (spec.material.digest).
	// +optional
	Digest string `json:"digest,omitempty"`
	// Objects are the Secrets and ConfigMaps the digest was computed from.
	// +kubebuilder:validation:MaxItems=128
	// +optional
	Objects []MaterialObject `json:"objects,omitempty"`
}

// MaterialObject names one Secret or ConfigMap and the version of it that was read.
type MaterialObject struct {
	// Kind is Secret or ConfigMap.
	Kind string `json:"kind"`
	// Name of the object in the operator's namespace.
	Name string `json:"name"`
	// ResourceVersion of the object that was read.
	ResourceVersion string `json:"resourceVersion"`
}

// HandledRequests are the tokens of the operator actions last acted on. A token longer than 64
// characters is recorded as "sha256:" and its digest's first 32 hex digits.
type HandledRequests struct {
	// Promote is the last gateway.agent.dev/promote token handled.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	Promote string `json:"promote,omitempty"`
	// Resume is the last gateway.agent.dev/resume token handled.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	Resume string `json:"resume,omitempty"`
	// Abort is the last gateway.agent.dev/abort token handled.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	Abort string `json:"abort,omitempty"`
}

// Annotations a person sets on a GatewayProfile to act on its rollout. The value is a request
// token (any new value, e.g. the time: `gateway.agent.dev/promote=$(date +%s)`): the controller
// acts once per token and records it in status.lastHandled; the annotation stays.
const (
	AnnotationPromote = "gateway.agent.dev/promote"
	AnnotationResume  = "gateway.agent.dev/resume"
	AnnotationAbort   = "gateway.agent.dev/abort"
)

// GatewayProfile runs one agent runtime profile (a channel gateway, an HTTP API, an MCP
// endpoint ...) on every selected host as its own systemd instance `agent-gateway@<name>`.
// Its name is the profile name: a DNS label of at most 26 characters, so that the profile's
// user `agent-<name>` fits Linux's 32-character limit, and not a reserved name (`microvm`, whose
// `agent-microvm` is the node agent's QEMU user).
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=gwp,categories=gateway
// +kubebuilder:validation:XValidation:rule="self.metadata.name.size() <= 26",message="metadata.name: a profile name must be at most 26 characters, so that its user agent-<name> fits in 32"
// +kubebuilder:validation:XValidation:rule="self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",message="metadata.name: a profile name must be a DNS label: lowercase letters, digits and '-', starting with a letter and ending with a letter or digit"
// +kubebuilder:validation:XValidation:rule="!(self.metadata.name in ['microvm'])",message="metadata.name: a profile name must not be a reserved name (microvm): agent-<name> is then an account the node agent uses for itself"
// +kubebuilder:printcolumn:name="Release",type=string,JSONPath=`.spec.release`
// +kubebuilder:printcolumn:name="Hosts",type=integer,JSONPath=`.status.desired`
// +kubebuilder:printcolumn:name="Updated",type=integer,JSONPath=`.status.updated`
// +kubebuilder:printcolumn:name="Aligned",type=integer,JSONPath=`.status.aligned`
// +kubebuilder:printcolumn:name="Degraded",type=integer,JSONPath=`.status.degraded`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Rollout",type=string,JSONPath=`.status.rollout.phase`,priority=1
// +kubebuilder:printcolumn:name="Isolation",type=string,JSONPath=`.spec.isolation`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type GatewayProfile struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the desired state of the profile across the fleet.
	Spec GatewayProfileSpec `json:"spec"`

	// Status is written by the controller manager.
	// +optional
	Status GatewayProfileStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// GatewayProfileList is a list of GatewayProfiles.
type GatewayProfileList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []GatewayProfile `json:"items"`
}

func init() {
	register(&GatewayProfile{}, &GatewayProfileList{})
}
