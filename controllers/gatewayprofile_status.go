package controllers

import (
	"fmt"
	"math"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// instanceState is what the controller reads from one instance's status.
type instanceState struct {
	updated, aligned, degraded bool
	reason                     string
}

// stateOf decides whether an instance asks for the target release, runs it proven, or failed.
func stateOf(gi *v1.GatewayInstance, target *v1.Release) instanceState {
	var s instanceState
	if target == nil {
		return s
	}
	s.updated = gi.Spec.Release.SHA256 == target.Spec.SHA256 && gi.Spec.ConfigHash != ""
	fresh := gi.Status.ObservedGeneration == gi.Generation
	if d := meta.FindStatusCondition(gi.Status.Conditions, v1.ConditionDegraded); d != nil && d.Status == metav1.ConditionTrue && fresh {
		s.degraded, s.reason = true, d.Message
	}
	s.aligned = s.updated && fresh && !s.degraded &&
		meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned) &&
		gi.Status.ConfigHash == gi.Spec.ConfigHash &&
		gi.Status.CurrentRelease != nil && gi.Status.CurrentRelease.SHA256 == target.Spec.SHA256
	return s
}

// summarize counts the instances into the profile's status and returns, for each degraded
// host, what it reported.
func summarize(p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance, target *v1.Release) []string {
	var failed []string
	st := &p.Status
	st.Updated, st.Aligned, st.Degraded = 0, 0, 0
	currents := map[string]*v1.ReleaseSummary{}
	for _, gi := range instances {
		s := stateOf(gi, target)
		if s.updated {
			st.Updated++
		}
		if s.aligned {
			st.Aligned++
		}
		if s.degraded {
			st.Degraded++
			failed = append(failed, gi.Spec.Host+": "+s.reason)
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

// setSummaryConditions derives Ready, Progressing and Degraded from the counts; failed names
// the degraded hosts and their reasons.
func setSummaryConditions(p *v1.GatewayProfile, failed []string) {
	st := &p.Status
	set := func(t string, s metav1.ConditionStatus, reason, msg string) {
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: p.Generation})
	}
	label := ""
	if st.TargetRelease != nil {
		label = st.TargetRelease.Label
	}
	switch {
	case st.Desired == 0:
		set(v1.ConditionReady, metav1.ConditionFalse, "NoHostsSelected", "the nodeSelector matches no GatewayHost")
		set(v1.ConditionProgressing, metav1.ConditionFalse, "NoHostsSelected", "nothing to roll out")
	case st.Aligned == st.Desired:
		set(v1.ConditionReady, metav1.ConditionTrue, "AllAligned", fmt.Sprintf("all %d hosts run release %s, proven", st.Desired, label))
		set(v1.ConditionProgressing, metav1.ConditionFalse, "Complete", fmt.Sprintf("release %s is rolled out", label))
	default:
		set(v1.ConditionReady, metav1.ConditionFalse, "NotAligned", fmt.Sprintf("%d of %d hosts run release %s, proven", st.Aligned, st.Desired, label))
		set(v1.ConditionProgressing, metav1.ConditionTrue, "RollingOut", fmt.Sprintf("%d of %d hosts updated to %s, %d aligned", st.Updated, st.Desired, label, st.Aligned))
	}
	if st.Degraded > 0 {
		set(v1.ConditionDegraded, metav1.ConditionTrue, "InstancesDegraded", fmt.Sprintf("%d hosts failed to apply release %s: %s", st.Degraded, label, hostList(failed)))
	} else {
		set(v1.ConditionDegraded, metav1.ConditionFalse, "NoFailures", "no host reports a failure")
	}
}

// count32 is a count of hosts as the status's int32, saturating instead of wrapping.
func count32(n int) int32 {
	return int32(min(max(n, 0), math.MaxInt32))
}
