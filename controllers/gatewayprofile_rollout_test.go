package controllers_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// simulatedAgents apply every instance of a profile the way real agents report: an instance
// whose spec changed is reported aligned (or, on a failing host, degraded and rolled back)
// after a short delay. They also record the most instances ever seen moving at once.
type simulatedAgents struct {
	t       *testing.T
	profile string
	delay   time.Duration

	mu       sync.Mutex
	failing  map[string]bool // host -> fails any release with this sha
	failSHA  string
	seen     map[string]time.Time
	maxMoves int
	target   string // sha counted as "moving" when not yet aligned
	hold     bool   // the agents answer nothing while set
}

func startSimulatedAgents(t *testing.T, profile string) *simulatedAgents {
	a := &simulatedAgents{t: t, profile: profile, delay: 300 * time.Millisecond, failing: map[string]bool{}, seen: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			a.step(ctx)
			time.Sleep(50 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return a
}

func (a *simulatedAgents) step(ctx context.Context) {
	var list v1.GatewayInstanceList
	if err := c.List(ctx, &list, client.MatchingLabels{v1.LabelProfile: a.profile}); err != nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	moving := 0
	for i := range list.Items {
		gi := &list.Items[i]
		retry := v1.RequestToken(gi.Annotations[v1.AnnotationRetry])
		applied := gi.Status.ObservedGeneration == gi.Generation && gi.Status.ConfigHash == gi.Spec.ConfigHash &&
			gi.Status.LastHandledRetry == retry
		if gi.Spec.Release.SHA256 == a.target && !meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned) ||
			gi.Spec.Release.SHA256 == a.target && !applied {
			moving++
		}
		if applied || !gi.DeletionTimestamp.IsZero() || a.hold {
			continue
		}
		key := fmt.Sprintf("%s/%d/%s", gi.Name, gi.Generation, retry)
		first, ok := a.seen[key]
		if !ok {
			a.seen[key] = time.Now()
			continue
		}
		if time.Since(first) < a.delay {
			continue
		}
		base := gi.DeepCopy()
		gen := gi.Generation
		set := func(typ string, s metav1.ConditionStatus, reason string) {
			meta.SetStatusCondition(&gi.Status.Conditions, metav1.Condition{Type: typ, Status: s, Reason: reason, Message: reason, ObservedGeneration: gen})
		}
		gi.Status.ObservedGeneration = gen
		gi.Status.LastHandledRetry = retry
		if a.failing[gi.Spec.Host] && gi.Spec.Release.SHA256 == a.failSHA {
			// A real agent rolls the host back and reports the failure.
			set(v1.ConditionAligned, metav1.ConditionFalse, "RolledBack")
			set(v1.ConditionDegraded, metav1.ConditionTrue, "ProofFailed")
		} else {
			gi.Status.ConfigHash = gi.Spec.ConfigHash
			gi.Status.CurrentRelease = &v1.ReleaseSummary{Name: gi.Spec.Release.Name, Label: gi.Spec.Release.Label, SHA256: gi.Spec.Release.SHA256}
			set(v1.ConditionAligned, metav1.ConditionTrue, "Proven")
			set(v1.ConditionDegraded, metav1.ConditionFalse, "Applied")
		}
		_ = c.Status().Patch(ctx, gi, client.MergeFrom(base))
	}
	if moving > a.maxMoves {
		a.maxMoves = moving
	}
}

func (a *simulatedAgents) watch(sha string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.target, a.maxMoves = sha, 0
}

func (a *simulatedAgents) peak() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.maxMoves
}

func onRelease(t *testing.T, profile, sha string) int {
	t.Helper()
	var list v1.GatewayInstanceList
	if err := c.List(context.Background(), &list, client.MatchingLabels{v1.LabelProfile: profile}); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, gi := range list.Items {
		if gi.Spec.Release.SHA256 == sha {
			n++
		}
	}
	return n
}

func rolloutPhase(t *testing.T, name string, want v1.RolloutPhase) func() (bool, string) {
	return func() (bool, string) {
		p := getProfile(t, name)
		if p.Status.Rollout == nil {
			return false, "no rollout status"
		}
		return p.Status.Rollout.Phase == want, fmt.Sprintf("%s: %s", p.Status.Rollout.Phase, p.Status.Rollout.Step)
	}
}

// annotate asks for an operator action with a new request token, and returns the token.
func annotate(t *testing.T, name, key string) string {
	t.Helper()
	p := getProfile(t, name)
	base := p.DeepCopy()
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	token := fmt.Sprint(time.Now().UnixNano())
	p.Annotations[key] = token
	if err := c.Patch(context.Background(), p, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	return token
}

// setRelease changes a profile's release (and strategy), retrying when the controller wrote the
// profile in between.
func setRelease(t *testing.T, name, release string, mutate func(*v1.RolloutStrategy)) {
	t.Helper()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p := getProfile(t, name)
		p.Spec.Release = release
		if mutate != nil {
			mutate(&p.Spec.Rollout)
		}
		return c.Update(context.Background(), p)
	}); err != nil {
		t.Fatal(err)
	}
}

// TestRollout50HostsSimulatedAgents rolls releases over 50 hosts whose agents are simulated:
// canary, pause, promote, complete; a failing host halts the rollout within capacity; abort
// returns the moved hosts; a controller restart mid-rollout keeps the in-flight limit.
func TestRollout50HostsSimulatedAgents(t *testing.T) {
	const n = 50
	var names []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("fl-%02d", i)
		names = append(names, name)
		mustCreate(t, host(name, map[string]string{"pool": "fleet"}))
	}
	simulatedAgentHeartbeats(t, names...)
	shas := []string{strings.Repeat("1", 64), strings.Repeat("2", 64), strings.Repeat("3", 64), strings.Repeat("4", 64)}
	for i, sha := range shas {
		mustCreate(t, rel(fmt.Sprintf("fl-r%d", i+1), fmt.Sprintf("%d.0.0", i+1), sha))
	}
	agents := startSimulatedAgents(t, "fleet")
	p := profile("fleet", "fl-r1", map[string]string{"pool": "fleet"})
	tenPct := intstr.FromString("10%")
	p.Spec.Rollout.MaxUnavailable = &tenPct
	mustCreate(t, p)
	const limit = 5 // 10% of 50

	eventually(t, "the first release on every host", rolloutPhase(t, "fleet", v1.RolloutComplete))
	if got := onRelease(t, "fleet", shas[0]); got != n {
		t.Fatalf("%d hosts on 1.0.0, want %d", got, n)
	}

	// Canary of two hosts, paused until promoted.
	agents.watch(shas[1])
	two := intstr.FromInt32(2)
	setRelease(t, "fleet", "fl-r2", func(s *v1.RolloutStrategy) { s.Canary = &v1.CanaryStep{Hosts: &two} })
	eventually(t, "the canary pause", rolloutPhase(t, "fleet", v1.RolloutPaused))
	time.Sleep(time.Second) // a paused rollout stays put
	if got := onRelease(t, "fleet", shas[1]); got != 2 {
		t.Fatalf("%d hosts on 2.0.0 during the canary pause, want 2", got)
	}
	if !meta.IsStatusConditionTrue(getProfile(t, "fleet").Status.Conditions, v1.ConditionPaused) {
		t.Error("no Paused condition during the canary pause")
	}
	promoted := annotate(t, "fleet", v1.AnnotationPromote)
	eventually(t, "2.0.0 everywhere", rolloutPhase(t, "fleet", v1.RolloutComplete))
	if got := onRelease(t, "fleet", shas[1]); got != n {
		t.Fatalf("%d hosts on 2.0.0, want %d", got, n)
	}
	if peak := agents.peak(); peak > limit {
		t.Errorf("%d hosts moved at once, maxUnavailable is %d", peak, limit)
	}
	if h := getProfile(t, "fleet").Status.LastHandled; h == nil || h.Promote != promoted {
		t.Errorf("the promote request %s is not recorded as handled: %+v", promoted, h)
	}

	// A host that fails 3.0.0 halts the rollout; nothing more moves.
	agents.watch(shas[2])
	agents.mu.Lock()
	agents.failing, agents.failSHA = map[string]bool{}, shas[2]
	for _, h := range names {
		agents.failing[h] = true // whichever host moves first fails
	}
	agents.mu.Unlock()
	setRelease(t, "fleet", "fl-r3", func(s *v1.RolloutStrategy) { s.Canary = nil })
	eventually(t, "the halt", rolloutPhase(t, "fleet", v1.RolloutHalted))
	halted := onRelease(t, "fleet", shas[2])
	time.Sleep(2 * time.Second)
	if got := onRelease(t, "fleet", shas[2]); got != halted || got > limit {
		t.Errorf("after the halt %d hosts were on 3.0.0, then %d (limit %d)", halted, got, limit)
	}
	fp := getProfile(t, "fleet")
	d := meta.FindStatusCondition(fp.Status.Conditions, v1.ConditionDegraded)
	if d == nil || d.Status != metav1.ConditionTrue || !strings.Contains(d.Message, "fl-") || !strings.Contains(d.Message, "ProofFailed") {
		t.Errorf("Degraded condition: %+v", d)
	}
	if fp.Status.Rollout.FailedHosts == 0 || len(fp.Status.Rollout.Failed) == 0 {
		t.Errorf("rollout status: %+v", fp.Status.Rollout)
	}

	// Abort: every moved host returns to 2.0.0.
	annotate(t, "fleet", v1.AnnotationAbort)
	eventually(t, "the abort", rolloutPhase(t, "fleet", v1.RolloutAborted))
	eventually(t, "every host back on 2.0.0", func() (bool, string) {
		got := onRelease(t, "fleet", shas[1])
		return got == n, fmt.Sprintf("%d on 2.0.0", got)
	})

	// A new target, and a controller restart in the middle of it.
	agents.mu.Lock()
	agents.failing = map[string]bool{}
	agents.delay = time.Second
	agents.mu.Unlock()
	agents.watch(shas[3])
	setRelease(t, "fleet", "fl-r4", nil)
	eventually(t, "the rollout of 4.0.0 to start", func() (bool, string) {
		got := onRelease(t, "fleet", shas[3])
		return got > 0, fmt.Sprint(got)
	})
	if err := stopManager(); err != nil {
		t.Fatal(err)
	}
	if err := startManager(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "4.0.0 everywhere after the restart", rolloutPhase(t, "fleet", v1.RolloutComplete))
	if peak := agents.peak(); peak > limit {
		t.Errorf("%d hosts moved at once across the restart, maxUnavailable is %d", peak, limit)
	}
	hist := getProfile(t, "fleet").Status.History
	// 1.0.0 and 2.0.0 completed, 3.0.0 was aborted; 4.0.0 is the current rollout.
	if len(hist) != 3 || hist[0].To == nil || hist[0].To.Label != "3.0.0" || hist[0].Result != "Aborted" {
		t.Errorf("history: %+v", hist)
	}
}
