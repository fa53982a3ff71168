package controllers_test

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// conditionsSay checks a profile's Ready status and reason, and which of the abnormal-true
// conditions (Reconciling, Stalled) are present.
func conditionsSay(t *testing.T, name string, ready metav1.ConditionStatus, reason string, reconciling, stalled bool) func() (bool, string) {
	return func() (bool, string) {
		p := getProfile(t, name)
		r := meta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady)
		rec := meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReconciling)
		st := meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionStalled)
		if r == nil {
			return false, "no Ready condition"
		}
		got := fmt.Sprintf("Ready=%s/%s Reconciling=%v Stalled=%v observed %d of %d: %s", r.Status, r.Reason, rec, st,
			p.Status.ObservedGeneration, p.Generation, r.Message)
		return r.Status == ready && r.Reason == reason && rec == reconciling && st == stalled &&
			r.ObservedGeneration == p.Generation && p.Status.ObservedGeneration == p.Generation, got
	}
}

// setEnv changes one setting of a profile, nothing else.
func setEnv(t *testing.T, name, value string) {
	t.Helper()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p := getProfile(t, name)
		p.Spec.Env = []v1.EnvVar{{Name: "MODE", Value: value}}
		return c.Update(context.Background(), p)
	}); err != nil {
		t.Fatal(err)
	}
}

// kubectlWait runs `kubectl wait --for=condition=Ready` on a profile in the background; the
// channel gets its error (nil: it saw Ready) when it returns.
func kubectlWait(t *testing.T, name string) <-chan error {
	t.Helper()
	kc, err := cp.Kubeconfig(t.TempDir(), "waiter", "system:masters")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cp.Kubectl(), "--kubeconfig", kc, "wait", "--for=condition=Ready", "gwp/"+name, "--timeout=60s")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("%w: %s", err, out.String())
		}
		done <- err
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return done
}

// TestSettingsOnlyRolloutSimulatedAgents changes only a setting of a profile with a canary
// step: the rollout and the summary read the instances the same way, so while the canary
// pause holds the profile is neither Ready nor Complete, one host counts as updated, and
// `kubectl wait --for=condition=Ready` returns only once every host is proven on the new
// settings. Operator requests are tokens: a promote acts once, and the annotation left on
// the profile does not promote the next rollout's canary.
func TestSettingsOnlyRolloutSimulatedAgents(t *testing.T) {
	const n = 4
	var names []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("so-%d", i)
		names = append(names, name)
		mustCreate(t, host(name, map[string]string{"pool": "so"}))
	}
	simulatedAgentHeartbeats(t, names...)
	mustCreate(t, rel("so-r1", "1.0.0", strings.Repeat("5", 64)))
	startSimulatedAgents(t, "so")
	p := profile("so", "so-r1", map[string]string{"pool": "so"})
	one := intstr.FromInt32(1)
	p.Spec.Rollout.Canary = &v1.CanaryStep{Hosts: &one}
	mustCreate(t, p)
	eventually(t, "the first rollout", rolloutPhase(t, "so", v1.RolloutComplete))
	eventually(t, "Ready", conditionsSay(t, "so", metav1.ConditionTrue, "AllAligned", false, false))

	setEnv(t, "so", "b")
	eventually(t, "the canary pause", rolloutPhase(t, "so", v1.RolloutPaused))
	eventually(t, "not Ready while the canary pause holds", conditionsSay(t, "so", metav1.ConditionFalse, "CanaryPaused", true, false))
	wait := kubectlWait(t, "so")
	time.Sleep(time.Second)
	st := getProfile(t, "so").Status
	if st.Updated != 1 || st.Aligned > 1 || st.Rollout.UpdatedHosts != 1 {
		t.Errorf("during the canary pause: updated %d, aligned %d, rollout updated %d; want 1, at most 1, 1", st.Updated, st.Aligned, st.Rollout.UpdatedHosts)
	}
	select {
	case err := <-wait:
		t.Fatalf("kubectl wait returned during the canary pause: %v", err)
	default:
	}
	token := annotate(t, "so", v1.AnnotationPromote)
	select {
	case err := <-wait:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("kubectl wait did not return")
	}
	st = getProfile(t, "so").Status
	if st.Aligned != n || st.Updated != n || st.Rollout.Phase != v1.RolloutComplete {
		t.Errorf("kubectl wait returned with %d of %d aligned, %d updated, phase %s", st.Aligned, n, st.Updated, st.Rollout.Phase)
	}
	if st.LastHandled == nil || st.LastHandled.Promote != token {
		t.Errorf("promote %s not recorded: %+v", token, st.LastHandled)
	}
	if _, ok := getProfile(t, "so").Annotations[v1.AnnotationPromote]; !ok {
		t.Error("the request annotation was removed; it stays, its token handled")
	}

	// The next rollout pauses at its canary again: the promote token was handled already.
	setEnv(t, "so", "c")
	eventually(t, "the next canary pause", rolloutPhase(t, "so", v1.RolloutPaused))
	time.Sleep(time.Second)
	if ph := getProfile(t, "so").Status.Rollout.Phase; ph != v1.RolloutPaused {
		t.Fatalf("the old promote token promoted a new rollout: %s", ph)
	}
	annotate(t, "so", v1.AnnotationPromote)
	eventually(t, "the promoted rollout", rolloutPhase(t, "so", v1.RolloutComplete))
	eventually(t, "Ready again", conditionsSay(t, "so", metav1.ConditionTrue, "AllAligned", false, false))
}

// TestHaltIsStalledAndResumeIsNotAFailureSimulatedAgents: a halted rollout is Stalled (only a
// person can move it on); after a resume, a retried host counts as moving until its agent has
// answered that retry, so its old failure does not halt the rollout again.
func TestHaltIsStalledAndResumeIsNotAFailureSimulatedAgents(t *testing.T) {
	mustCreate(t, host("hr-0", map[string]string{"pool": "hr"}))
	simulatedAgentHeartbeats(t, "hr-0")
	good, bad := strings.Repeat("6", 64), strings.Repeat("7", 64)
	mustCreate(t, rel("hr-good", "1.0.0", good))
	mustCreate(t, rel("hr-bad", "2.0.0", bad))
	agents := startSimulatedAgents(t, "hr")
	mustCreate(t, profile("hr", "hr-good", map[string]string{"pool": "hr"}))
	eventually(t, "the first rollout", rolloutPhase(t, "hr", v1.RolloutComplete))

	agents.mu.Lock()
	agents.failSHA, agents.failing["hr-0"] = bad, true
	agents.mu.Unlock()
	setRelease(t, "hr", "hr-bad", nil)
	eventually(t, "the halt", rolloutPhase(t, "hr", v1.RolloutHalted))
	eventually(t, "Stalled", conditionsSay(t, "hr", metav1.ConditionFalse, "RolloutHalted", false, true))

	// The host would pass now, but its agent has not answered yet.
	agents.mu.Lock()
	agents.failing["hr-0"], agents.hold = false, true
	agents.mu.Unlock()
	token := annotate(t, "hr", v1.AnnotationResume)
	eventually(t, "the retry asked of the host", func() (bool, string) {
		gi, err := getInstance(v1.InstanceName("hr", "hr-0"))
		if err != nil {
			return false, err.Error()
		}
		return gi.Annotations[v1.AnnotationRetry] != "", fmt.Sprint(gi.Annotations)
	})
	eventually(t, "the rollout moving again", rolloutPhase(t, "hr", v1.RolloutProgressing))
	eventually(t, "Reconciling", conditionsSay(t, "hr", metav1.ConditionFalse, "RollingOut", true, false))
	if h := getProfile(t, "hr").Status.LastHandled; h == nil || h.Resume != token {
		t.Errorf("resume %s not recorded: %+v", token, h)
	}
	time.Sleep(time.Second)
	if ph := getProfile(t, "hr").Status.Rollout.Phase; ph != v1.RolloutProgressing {
		t.Fatalf("before the agent answered the retry, the rollout is %s", ph)
	}
	agents.mu.Lock()
	agents.hold = false
	agents.mu.Unlock()
	eventually(t, "the rollout completes", rolloutPhase(t, "hr", v1.RolloutComplete))
	eventually(t, "Ready", conditionsSay(t, "hr", metav1.ConditionTrue, "AllAligned", false, false))
}
