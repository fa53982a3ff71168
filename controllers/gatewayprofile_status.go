package controllers

import (
	"fmt"
	"math"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers/rollout"
)

// instanceView is the one reading of an instance that both the rollout planner and the
// profile's summary use, so the two never disagree about a host.
type instanceView struct {
	// onTarget is true when the spec asks for the target: its release and its settings.
	onTarget bool
	// movedAt is when the spec was moved to what it asks now (zero if unknown).
	movedAt time.Time
	// aligned is true when the agent proved the host runs exactly what the spec asks.
	aligned   bool
	alignedAt time.Time
	// degraded is true when the agent's last apply of this spec failed; reason says why.
	degraded bool
	reason   string
}

// viewOf reads one instance against the hash of the spec the target asks of its host (empty
// when there is no target). A status counts only when it answers the current spec and the
// last retry request: until the agent has applied those, the host is still on its way.
func viewOf(gi *v1.GatewayInstance, targetHash string) instanceView {
	v := instanceView{onTarget: targetHash != "" && gi.Spec.ConfigHash == targetHash}
	if t, err := time.Parse(time.RFC3339, gi.Annotations[annotationMovedAt]); err == nil {
		v.movedAt = t
	}
	st := &gi.Status
	_, asked := v1.Requested(gi, v1.AnnotationRetry, st.LastHandledRetry)
	if st.ObservedGeneration != gi.Generation || asked {
		return v
	}
	if d := meta.FindStatusCondition(st.Conditions, v1.ConditionDegraded); d != nil && d.Status == metav1.ConditionTrue {
		v.degraded, v.reason = true, d.Reason+": "+d.Message
		return v
	}
	if a := meta.FindStatusCondition(st.Conditions, v1.ConditionAligned); a != nil && a.Status == metav1.ConditionTrue &&
		st.ConfigHash == gi.Spec.ConfigHash && st.CurrentRelease != nil && st.CurrentRelease.SHA256 == gi.Spec.Release.SHA256 {
		v.aligned, v.alignedAt = true, a.LastTransitionTime.Time
	}
	return v
}

// planned is what the planner needs of the view.
func (v instanceView) planned() rollout.Instance {
	return rollout.Instance{OnTarget: v.onTarget, MovedAt: v.movedAt, Aligned: v.aligned, AlignedAt: v.alignedAt,
		Degraded: v.degraded, Reason: v.reason}
}

// summarize counts the instances into the profile's status, each read by viewOf against the
// spec hash the target asks of its host (hashFor nil: no target), and returns, for each
// degraded host, what it reported.
func summarize(p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance, target *v1.Release, hashFor func(host string) string) []string {
	var failed []string
	st := &p.Status
	st.Updated, st.Aligned, st.Degraded = 0, 0, 0
	currents := map[string]*v1.ReleaseSummary{}
	for host, gi := range instances {
		hash := ""
		if hashFor != nil {
			hash = hashFor(host)
		}
		v := viewOf(gi, hash)
		if v.onTarget {
			st.Updated++
			if v.aligned {
				st.Aligned++
			}
		}
		if v.degraded {
			st.Degraded++
			failed = append(failed, host+": "+v.reason)
		}
		if c := gi.Status.CurrentRelease; c != nil {
			currents[c.SHA256] = c
		}
	}
	if target != nil {
		st.TargetRelease = &v1.ReleaseSummary{Name: target.Name, Label: target.Spec.Label, SHA256: target.Spec.SHA256}
	}
	// The current release is the one every host runs, when they agree.
	if len(currents) == 1 && len(instances) > 0 {
		for _, c := range currents {
			st.CurrentRelease = c.DeepCopy()
		}
	}
	return failed
}

// setSummaryConditions derives Ready, Reconciling, Stalled, Progressing and Degraded from the
// rollout's phase and the counts; failed names the degraded hosts and their reasons. Ready is
// True only when the rollout is complete and every selected host is proven on the target.
func setSummaryConditions(p *v1.GatewayProfile, failed []string) {
	st := &p.Status
	label := ""
	if st.TargetRelease != nil {
		label = st.TargetRelease.Label
	}
	var phase v1.RolloutPhase
	step := ""
	if st.Rollout != nil {
		phase, step = st.Rollout.Phase, st.Rollout.Step
	}
	proven := fmt.Sprintf("%d of %d hosts run release %s, proven", st.Aligned, st.Desired, label)
	switch {
	case st.Desired == 0:
		setState(p, metav1.ConditionFalse, "NoHostsSelected", "the nodeSelector matches no GatewayHost", stateIdle)
	case phase == v1.RolloutHalted:
		setState(p, metav1.ConditionFalse, "RolloutHalted", fmt.Sprintf("%s; %s; roll back (set spec.release to %s) or resume (annotate gateway.agent.dev/resume with a new token)",
			proven, step, fromName(st.Rollout)), stateStalled)
	case phase == v1.RolloutAborted:
		setState(p, metav1.ConditionFalse, "RolloutAborted", proven+"; "+step, stateStalled)
	case phase == v1.RolloutComplete && st.Aligned == st.Desired:
		setState(p, metav1.ConditionTrue, "AllAligned", fmt.Sprintf("all %d hosts run release %s, proven", st.Desired, label), stateIdle)
	case phase == v1.RolloutComplete:
		// Every host that can move has: the rest are cordoned or out of reach.
		setState(p, metav1.ConditionFalse, "NotAligned", proven+"; the others are cordoned or unreachable", stateIdle)
	case phase == v1.RolloutPaused && p.Spec.Rollout.Paused:
		setState(p, metav1.ConditionFalse, "Paused", proven+"; "+step, stateReconciling)
	case phase == v1.RolloutPaused:
		setState(p, metav1.ConditionFalse, "CanaryPaused", proven+"; "+step, stateReconciling)
	default:
		setState(p, metav1.ConditionFalse, "RollingOut", fmt.Sprintf("%s; %d updated", proven, st.Updated), stateReconciling)
	}
	if st.Degraded > 0 {
		v1.SetCondition(p, v1.ConditionDegraded, metav1.ConditionTrue, "InstancesDegraded", fmt.Sprintf("%d hosts failed to apply: %s", st.Degraded, hostList(failed)))
	} else {
		v1.SetCondition(p, v1.ConditionDegraded, metav1.ConditionFalse, "NoFailures", "no host reports a failure")
	}
}

// What the controller is doing about a profile, in the terms of the Reconciling and Stalled
// conditions.
const (
	stateIdle        = iota // at the spec, or nothing to do until the cluster changes
	stateReconciling        // working toward the spec
	stateStalled            // cannot go on without a person
)

// setState sets Ready with its reason and message, Reconciling and Stalled (present only when
// they apply) and Progressing, all saying the same.
func setState(p *v1.GatewayProfile, ready metav1.ConditionStatus, reason, msg string, state int) {
	v1.SetCondition(p, v1.ConditionReady, ready, reason, msg)
	v1.SetAbnormal(p, v1.ConditionReconciling, state == stateReconciling, reason, msg)
	v1.SetAbnormal(p, v1.ConditionStalled, state == stateStalled, reason, msg)
	progressing := metav1.ConditionFalse
	if state == stateReconciling {
		progressing = metav1.ConditionTrue
	}
	v1.SetCondition(p, v1.ConditionProgressing, progressing, reason, msg)
}

func fromName(st *v1.RolloutStatus) string {
	if st == nil || st.From == nil {
		return "the last good release"
	}
	return st.From.Name
}

// count32 is a count of hosts as the status's int32, saturating instead of wrapping.
func count32(n int) int32 {
	return int32(min(max(n, 0), math.MaxInt32))
}
