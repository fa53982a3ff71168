package v1alpha1

import (
	"crypto/sha256"
	"encoding/hex"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types. Every status in this API reports metav1.Condition entries of these types,
// each stamped with the generation it was computed for. Ready, Reconciling and Stalled follow
// the conventions generic tools read (kstatus: Reconciling and Stalled are "abnormal-true",
// present only when they apply), so `kubectl wait --for=condition=Ready` and GitOps health
// checks understand every kind.
const (
	// ConditionReady is True when the object does what its spec asks.
	ConditionReady = "Ready"
	// ConditionReconciling is True while the controller works toward the spec and expects to
	// get there without help.
	ConditionReconciling = "Reconciling"
	// ConditionStalled is True when the controller cannot get to the spec without a person:
	// a halted rollout, a missing release, a failed apply or tool run.
	ConditionStalled = "Stalled"
	// ConditionComplete is True when a ToolRun finished successfully (as a Job's).
	ConditionComplete = "Complete"
	// ConditionFailed is True when a ToolRun failed, timed out or was rejected (as a Job's).
	ConditionFailed = "Failed"
	// ConditionProgressing is True while a change is being rolled out.
	ConditionProgressing = "Progressing"
	// ConditionDegraded is True when something failed; its message names what and where.
	ConditionDegraded = "Degraded"
	// ConditionAligned is True when a GatewayInstance's running process was proven to import
	// exactly the intended release (one PYTHONPATH, resolving into that release's tree).
	ConditionAligned = "Aligned"
	// ConditionIsolated is True when a GatewayInstance runs under Production isolation and the
	// hardening was verified on the host. Convenience mode always reports False.
	ConditionIsolated = "Isolated"
	// ConditionDrifted is True when a GatewayInstance's host differs from what its agent
	// rendered and proved (a file, a link, the unit's state or main process); its message names
	// what changed, what was expected and what was found, and when. After a heal it is False
	// with reason Healed.
	ConditionDrifted = "Drifted"
	// ConditionPaused is True when a rollout is paused by a person or by a canary step.
	ConditionPaused = "Paused"
	// ConditionReachable is False when a GatewayHost's heartbeat is older than the grace period.
	ConditionReachable = "Reachable"
	// ConditionDuplicateAgent is True when two agents heart-beat one GatewayHost: one host
	// identity is in use on two machines.
	ConditionDuplicateAgent = "DuplicateAgent"
)

// Well-known labels and finalizers.
const (
	// LabelProfile is set on every GatewayInstance to its GatewayProfile's name.
	LabelProfile = "gateway.agent.dev/profile"
	// LabelHost is set on every GatewayInstance to its GatewayHost's name; agents watch by it.
	LabelHost = "gateway.agent.dev/host"
	// LabelReportedPrefix starts the only GatewayHost labels a host's agent may set: facts it
	// reports about its host (LabelReportedArch, ...). A compromised host can forge them, so
	// profiles must not select on them; every other label is an administrator's.
	LabelReportedPrefix = "reported.gateway.agent.dev/"
	// LabelReportedArch is the host's CPU architecture, as Go names it (amd64, arm64).
	LabelReportedArch = LabelReportedPrefix + "arch"
	// LabelReportedKVM is "true" when the agent can open /dev/kvm.
	LabelReportedKVM = LabelReportedPrefix + "kvm"
	// LabelReportedKata is "true" when a Kata shim is installed on the host.
	LabelReportedKata = LabelReportedPrefix + "kata"
	// FinalizerInstanceUnits is removed by a host's agent only once the instance's unit is gone.
	FinalizerInstanceUnits = "gateway.agent.dev/units"
	// FinalizerReleaseInUse keeps a Release while a GatewayProfile references it.
	FinalizerReleaseInUse = "gateway.agent.dev/in-use"
	// DefaultHostLeaseNamespace holds the hosts' heartbeat Leases (coordination.k8s.io/v1),
	// one per host, named after it: the operator's own namespace.
	DefaultHostLeaseNamespace = "gateway-operator-system"
)

// ConditionsObject is an object of this API whose status carries conditions.
// +kubebuilder:object:generate=false
type ConditionsObject interface {
	metav1.Object
	// StatusConditions points at the object's status conditions.
	StatusConditions() *[]metav1.Condition
}

// SetCondition sets one condition of o, stamped with o's generation; the transition time
// changes only with the status. It says whether anything changed.
func SetCondition(o ConditionsObject, t string, s metav1.ConditionStatus, reason, msg string) bool {
	return meta.SetStatusCondition(o.StatusConditions(), metav1.Condition{
		Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: o.GetGeneration()})
}

// RemoveCondition drops a condition that no longer applies (kstatus reads an absent
// Reconciling or Stalled as False).
func RemoveCondition(o ConditionsObject, t string) bool {
	return meta.RemoveStatusCondition(o.StatusConditions(), t)
}

// SetAbnormal sets an abnormal-true condition (Reconciling, Stalled) when it applies and
// removes it when it does not.
func SetAbnormal(o ConditionsObject, t string, applies bool, reason, msg string) bool {
	if !applies {
		return RemoveCondition(o, t)
	}
	return SetCondition(o, t, metav1.ConditionTrue, reason, msg)
}

// StatusConditions points at the host's status conditions.
func (o *GatewayHost) StatusConditions() *[]metav1.Condition { return &o.Status.Conditions }

// StatusConditions points at the release's status conditions.
func (o *Release) StatusConditions() *[]metav1.Condition { return &o.Status.Conditions }

// StatusConditions points at the profile's status conditions.
func (o *GatewayProfile) StatusConditions() *[]metav1.Condition { return &o.Status.Conditions }

// StatusConditions points at the instance's status conditions.
func (o *GatewayInstance) StatusConditions() *[]metav1.Condition { return &o.Status.Conditions }

// StatusConditions points at the run's status conditions.
func (o *ToolRun) StatusConditions() *[]metav1.Condition { return &o.Status.Conditions }

// RequestToken is how a status records the token of an operator's request (an annotation's
// value): as it is up to 64 characters, else as "sha256:" and 32 hex digits of its digest, so
// that a status stays bounded whatever a person writes.
func RequestToken(v string) string {
	if len(v) <= 64 {
		return v
	}
	sum := sha256.Sum256([]byte(v))
	return "sha256:" + hex.EncodeToString(sum[:16])
}

// Requested returns the token of a request annotation of o that is not handled yet: present,
// not empty, and not the token last handled.
func Requested(o metav1.Object, annotation, lastHandled string) (string, bool) {
	v, ok := o.GetAnnotations()[annotation]
	if !ok || v == "" {
		return "", false
	}
	t := RequestToken(v)
	return t, t != lastHandled
}
