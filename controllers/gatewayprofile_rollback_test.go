package controllers_test

import (
	"fmt"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// TestRollbackAfterHaltSimulatedAgents is the documented way back from a bad release: the
// agents roll the failed hosts back and the rollout halts; the operator sets spec.release to the
// good release again, and the rollout completes with Degraded cleared. With one host, and with
// a fleet whose failed hosts use up maxUnavailable, and with a canary step that a person
// promoted before the failures: the way back has no canary step (the release ran there before).
func TestRollbackAfterHaltSimulatedAgents(t *testing.T) {
	for _, tc := range []struct {
		name    string
		hosts   int
		maxUnav int32
		canary  bool
		hex     string // the releases' digests are made of it
	}{
		{"one-host", 1, 1, false, "a"},
		{"fleet", 6, 2, false, "c"},
		{"canary", 6, 2, true, "e"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prof := "rb-" + tc.name
			var names []string
			for i := 0; i < tc.hosts; i++ {
				name := fmt.Sprintf("%s-%d", prof, i)
				names = append(names, name)
				mustCreate(t, host(name, map[string]string{"pool": prof}))
			}
			simulatedAgentHeartbeats(t, names...)
			good, bad := strings.Repeat(tc.hex+"1", 32), strings.Repeat(tc.hex+"2", 32)
			mustCreate(t, rel(prof+"-good", "1.0.0", good))
			mustCreate(t, rel(prof+"-bad", "2.0.0", bad))
			agents := startSimulatedAgents(t, prof)
			failAll := func() {
				agents.mu.Lock()
				defer agents.mu.Unlock()
				agents.failSHA = bad
				for _, h := range names {
					agents.failing[h] = true
				}
			}
			if !tc.canary {
				failAll()
			}

			p := profile(prof, prof+"-good", map[string]string{"pool": prof})
			mu := intstr.FromInt32(tc.maxUnav)
			p.Spec.Rollout.MaxUnavailable = &mu
			mustCreate(t, p)
			eventually(t, "the good release on every host", rolloutPhase(t, prof, v1.RolloutComplete))

			if tc.canary {
				// The canary passes; every host after it fails.
				one := intstr.FromInt32(1)
				setRelease(t, prof, prof+"-bad", func(s *v1.RolloutStrategy) { s.Canary = &v1.CanaryStep{Hosts: &one} })
				eventually(t, "the canary pause", rolloutPhase(t, prof, v1.RolloutPaused))
				failAll()
				annotate(t, prof, v1.AnnotationPromote)
			} else {
				setRelease(t, prof, prof+"-bad", nil)
			}
			eventually(t, "the halt", rolloutPhase(t, prof, v1.RolloutHalted))
			eventually(t, "maxUnavailable used up by failed hosts", func() (bool, string) {
				st := getProfile(t, prof).Status.Rollout
				return st.FailedHosts == tc.maxUnav, fmt.Sprintf("%d failed", st.FailedHosts)
			})

			setRelease(t, prof, prof+"-good", nil)
			eventually(t, "the rollback completes", rolloutPhase(t, prof, v1.RolloutComplete))
			if got := onRelease(t, prof, good); got != tc.hosts {
				t.Errorf("%d instances ask for the good release, want %d", got, tc.hosts)
			}
			eventually(t, "Degraded cleared", func() (bool, string) {
				d := meta.FindStatusCondition(getProfile(t, prof).Status.Conditions, v1.ConditionDegraded)
				return d == nil || d.Status == metav1.ConditionFalse, fmt.Sprintf("%+v", d)
			})
			st := getProfile(t, prof).Status
			if st.Rollout.From == nil || st.Rollout.From.SHA256 != good {
				t.Errorf("the rollback starts from %+v, want the good release (the bad one never ran)", st.Rollout.From)
			}
			if len(st.History) == 0 || st.History[0].Result != "Superseded" {
				t.Errorf("history: %+v", st.History)
			}
		})
	}
}
