package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// GatewayInstanceSpec is everything a node agent needs to run one profile on its host. It is
// written by the controller manager; agents never read Releases or GatewayProfiles.
// +kubebuilder:validation:XValidation:rule="self.mode != 'script' || has(self.exec)",message="exec is required when mode is script",fieldPath=".exec"
// +kubebuilder:validation:XValidation:rule="self.mode == 'script' || !has(self.exec)",message="exec is only allowed when mode is script",fieldPath=".exec"
// +kubebuilder:validation:XValidation:rule="!has(self.isolation) || self.isolation != 'Convenience' || ((!has(self.envFrom) || size(self.envFrom) == 0) && (!has(self.files) || size(self.files) == 0) && (!has(self.env) || self.env.all(e, !has(e.valueFrom))))",message="isolation Convenience runs every profile as one shared user that can read the others' files and environment: env valueFrom, envFrom and files need isolation Production"
type GatewayInstanceSpec struct {
	// Profile is the GatewayProfile this instance belongs to; also the systemd instance name.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=26
	// +kubebuilder:validation:Pattern=`^[a-z]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="profile is immutable"
	// +kubebuilder:validation:XValidation:rule="!(self in ['microvm'])",message="profile must not be a reserved name (microvm): agent-<name> is then an account the node agent uses for itself"
	Profile string `json:"profile"`

	// Host is the GatewayHost this instance runs on.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="host is immutable"
	Host string `json:"host"`

	// Release is the build this instance must run.
	Release ReleaseArtifact `json:"release"`

	// AutoRollback returns the host to its last good release when an apply fails (the
	// profile's spec.rollout.autoRollback). When false the host stays on the failed release,
	// for inspection.
	// +kubebuilder:default=true
	// +optional
	AutoRollback *bool `json:"autoRollback,omitempty"`

	// HealthProbe, when set, is run by the agent after the alignment proof (the profile's
	// spec.rollout.healthProbe).
	// +optional
	HealthProbe *HealthProbe `json:"healthProbe,omitempty"`

	// ConfigHash is a digest of everything rendered for this instance (release, settings). The
	// agent reports it back in status once applied, so a reader can tell stale from current.
	// +kubebuilder:validation:MaxLength=128
	// +optional
	ConfigHash string `json:"configHash,omitempty"`

	// Material says where the agent reads the Secrets and ConfigMaps the settings name (env
	// valueFrom, envFrom, files) and what it must find there. Unset when they name none.
	// +optional
	Material *MaterialSource `json:"material,omitempty"`

	GatewaySettings `json:",inline"`
}

// MaterialSource locates a profile's secret and configuration material. It carries no value.
type MaterialSource struct {
	// Namespace holds the Secrets and ConfigMaps: the operator's.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`
	Namespace string `json:"namespace"`

	// Digest is MaterialDigest of the objects as the controller read them: a change of a value
	// changes it, and so the instance's config hash, and rolls out like any setting. The agent
	// applies only material whose digest it finds equal.
	// +kubebuilder:validation:Pattern=`^sha256:[a-f0-9]{64}$`
	Digest string `json:"digest"`
}

// AlignmentProof is what the agent read from the host to show that the running gateway process
// imports exactly the intended release.
//
// Facts only root controls identify the process: its PID and start time (the kernel's
// /proc/<pid>/stat), its control group (that of the unit, as systemd reports it), its user and
// executable. Other facts are read from the process itself (its environment block, working
// folder and status endpoint), which a hostile gateway could rewrite: SelfReported names them.
// The agent restarts a gateway after every change to what it reads at start, so these facts
// were produced by code of the intended release before anything else ran in it.
type AlignmentProof struct {
	// StartTime is the main process's start time in clock ticks since boot (/proc/<pid>/stat):
	// with the PID, it tells one process from a later one that reuses the PID.
	// +optional
	StartTime int64 `json:"startTime,omitempty"`

	// ControlGroup is the unit's control group, which the main process and the process that
	// answered on the status socket (SO_PEERCRED) were both found in.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	ControlGroup string `json:"controlGroup,omitempty"`

	// SelfReported lists the facts of this proof that come from the process itself and that
	// it could forge once running: e.g. "environ", "cwd", "status".
	// +kubebuilder:validation:MaxItems=16
	// +optional
	SelfReported []string `json:"selfReported,omitempty"`

	// SysPath is the gateway's import path (Python's sys.path) as its status endpoint reports
	// it: every entry must lie in the release or the interpreter's own library.
	// +kubebuilder:validation:MaxItems=64
	// +optional
	SysPath []string `json:"sysPath,omitempty"`

	// PythonPath is the single PYTHONPATH found in the main process's environment.
	// +optional
	PythonPath string `json:"pythonPath,omitempty"`

	// RuntimePath is where PYTHONPATH resolves to on the host: the release folder.
	// +optional
	RuntimePath string `json:"runtimePath,omitempty"`

	// Exe is the main process's executable.
	// +optional
	Exe string `json:"exe,omitempty"`

	// Cwd is the main process's working folder.
	// +optional
	Cwd string `json:"cwd,omitempty"`

	// ReleaseSHA256 is the release sha256 the process's environment declares.
	// +optional
	ReleaseSHA256 string `json:"releaseSHA256,omitempty"`

	// MaterialDigest is the digest of the secret and configuration material the process
	// started with (its AGENT_MATERIAL_DIGEST), equal to spec.material.digest; empty when the
	// profile names none.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	MaterialDigest string `json:"materialDigest,omitempty"`

	// UnitClean is true when the unit file and its drop-ins set no PYTHONPATH.
	// +optional
	UnitClean bool `json:"unitClean,omitempty"`

	// SiblingsUnchanged is true when no other profile's main process was restarted by this apply.
	// +optional
	SiblingsUnchanged bool `json:"siblingsUnchanged,omitempty"`

	// CheckedAt is when the proof was taken.
	// +optional
	CheckedAt *metav1.Time `json:"checkedAt,omitempty"`
}

// IsolationProof is what the agent verified of the instance's sandboxing.
type IsolationProof struct {
	// User the gateway process runs as.
	// +optional
	User string `json:"user,omitempty"`

	// ExposureScore is `systemd-analyze security`'s exposure score for the unit, 0.0 (best) to
	// 10.0 (worst).
	// +optional
	ExposureScore string `json:"exposureScore,omitempty"`

	// Message says in words how isolated the instance is, e.g. that Convenience mode is not.
	// +optional
	Message string `json:"message,omitempty"`

	// Checks is the evidence the agent gathered on the host, none of it from the gateway: the
	// unit's effective sandbox read back from systemd, a probe of the agent's own run as the
	// profile's user inside the same sandbox (siblings' homes and env files unreadable, /etc
	// read-only, a connection outside the allowlist dropped, no capabilities) and the exposure
	// score. Isolated is True only when every check passed.
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=32
	// +optional
	Checks []IsolationCheck `json:"checks,omitempty"`
}

// IsolationCheck is one piece of isolation evidence.
type IsolationCheck struct {
	// Name of the check, e.g. ProtectSystem, SiblingHomesUnreadable, ExposureScore.
	// +kubebuilder:validation:MaxLength=64
	Name string `json:"name"`

	// Passed is true when the check held.
	Passed bool `json:"passed"`

	// Message says what was found.
	// +kubebuilder:validation:MaxLength=1024
	// +optional
	Message string `json:"message,omitempty"`
}

// AnnotationRetry on a GatewayInstance asks its host's agent to apply it again (the controller
// sets it when a rollout is resumed); the value is a request token the agent records, as
// RequestToken gives it, in status.lastHandledRetry.
const AnnotationRetry = "gateway.agent.dev/retry"

// AnnotationRestart on a GatewayInstance asks its host's agent to restart exactly that
// profile's unit (a plugin change is picked up only by a restart) and prove it again, siblings
// untouched; the value is a request token the agent records, as RequestToken gives it, in
// status.lastHandledRestart. `kubectl gateway restart PROFILE --host HOST` sets it.
const AnnotationRestart = "gateway.agent.dev/restart"

// GatewayInstanceStatus is written by the instance's host agent only.
type GatewayInstanceStatus struct {
	// ObservedGeneration is the generation the agent last applied.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// ConfigHash is the spec.configHash the agent last applied.
	// +optional
	ConfigHash string `json:"configHash,omitempty"`

	// CurrentRelease is the release the profile's `current` link points at on the host.
	// +optional
	CurrentRelease *ReleaseSummary `json:"currentRelease,omitempty"`

	// LastGoodRelease is the newest release this instance was proven aligned on; a failed apply
	// flips back to it.
	// +optional
	LastGoodRelease *ReleaseSummary `json:"lastGoodRelease,omitempty"`

	// Unit is the systemd unit running this instance.
	// +optional
	Unit string `json:"unit,omitempty"`

	// MainPID of the unit, as seen on the host.
	// +optional
	MainPID int64 `json:"mainPID,omitempty"`

	// Alignment is the last alignment proof.
	// +optional
	Alignment *AlignmentProof `json:"alignment,omitempty"`

	// Isolation is the last isolation proof.
	// +optional
	Isolation *IsolationProof `json:"isolation,omitempty"`

	// LastHandledRetry is the gateway.agent.dev/retry token of the last apply this status
	// reports: until it matches the annotation, the status predates the retry.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	LastHandledRetry string `json:"lastHandledRetry,omitempty"`

	// LastHandledRestart is the gateway.agent.dev/restart token the agent last acted on: it
	// restarted the unit and tried to prove it, with the outcome in the conditions.
	// +kubebuilder:validation:MaxLength=71
	// +optional
	LastHandledRestart string `json:"lastHandledRestart,omitempty"`

	// Conditions: Ready, Aligned, Isolated, Degraded, and Stalled while the last apply failed
	// (the host waits for a new spec or a retry).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// GatewayInstance is one profile on one host, named `<profile>.<host>`. The controller manager
// writes its spec; only that host's agent writes its status.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=gwi,categories=gateway
// +kubebuilder:validation:XValidation:rule="self.metadata.name == self.spec.profile + '.' + self.spec.host",message="metadata.name must be <spec.profile>.<spec.host>"
// +kubebuilder:printcolumn:name="Profile",type=string,JSONPath=`.spec.profile`
// +kubebuilder:printcolumn:name="Host",type=string,JSONPath=`.spec.host`
// +kubebuilder:printcolumn:name="Target",type=string,JSONPath=`.spec.release.label`
// +kubebuilder:printcolumn:name="Current",type=string,JSONPath=`.status.currentRelease.label`
// +kubebuilder:printcolumn:name="PID",type=integer,JSONPath=`.status.mainPID`
// +kubebuilder:printcolumn:name="Aligned",type=string,JSONPath=`.status.conditions[?(@.type=="Aligned")].status`
// +kubebuilder:printcolumn:name="Isolated",type=string,JSONPath=`.status.conditions[?(@.type=="Isolated")].status`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type GatewayInstance struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is written by the controller manager.
	Spec GatewayInstanceSpec `json:"spec"`

	// Status is written by the host's agent.
	// +optional
	Status GatewayInstanceStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// GatewayInstanceList is a list of GatewayInstances.
type GatewayInstanceList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []GatewayInstance `json:"items"`
}

func init() {
	register(&GatewayInstance{}, &GatewayInstanceList{})
}
