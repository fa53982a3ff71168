package rollout

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

var now = time.Unix(1_000_000, 0)

func hosts(n int) []Host {
	hs := make([]Host, n)
	for i := range hs {
		hs[i] = Host{Name: fmt.Sprintf("h%02d", i), Reachable: true}
	}
	return hs
}

// serving: every host runs the old release, aligned.
func serving(hs []Host) map[string]Instance {
	m := map[string]Instance{}
	for _, h := range hs {
		m[h.Name] = Instance{Aligned: true, AlignedAt: now.Add(-time.Hour)}
	}
	return m
}

func ptr[T any](v T) *T { return &v }

func TestScaled(t *testing.T) {
	for _, tc := range []struct {
		v     *intstr.IntOrString
		total int
		want  int
	}{
		{nil, 10, 1},
		{ptr(intstr.FromInt32(3)), 10, 3},
		{ptr(intstr.FromInt32(30)), 10, 10},
		{ptr(intstr.FromString("10%")), 1000, 100},
		{ptr(intstr.FromString("10%")), 15, 1}, // 1.5 rounds down
		{ptr(intstr.FromString("10%")), 5, 1},  // 0.5 rounds down, minimum 1
		{ptr(intstr.FromString("34%")), 10, 3}, // 3.4
		{ptr(intstr.FromString("100%")), 7, 7},
	} {
		if got := Scaled(tc.v, tc.total, 1); got != tc.want {
			t.Errorf("Scaled(%v, %d) = %d, want %d", tc.v, tc.total, got, tc.want)
		}
	}
}

func TestOrderIsStableAndPerTarget(t *testing.T) {
	hs := hosts(20)
	a := Order(hs, "core", "k1")
	b := Order(append([]Host(nil), hs[10:]...), "core", "k1")
	pos := map[string]int{}
	for i, h := range a {
		pos[h.Name] = i
	}
	for i := 1; i < len(b); i++ {
		if pos[b[i-1].Name] > pos[b[i].Name] {
			t.Fatalf("order of a subset differs from the full order")
		}
	}
	if reflect.DeepEqual(names(a), names(Order(hs, "core", "k2"))) {
		t.Error("a new target gave the same order")
	}
	if reflect.DeepEqual(names(a), names(Order(hs, "api", "k1"))) {
		t.Error("another profile gave the same order")
	}
	if !reflect.DeepEqual(names(a), names(Order(hs, "core", "k1"))) {
		t.Error("the same inputs gave another order")
	}
}

func names(hs []Host) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = h.Name
	}
	return out
}

func TestPlan(t *testing.T) {
	ten := hosts(10)
	order := names(Order(ten, "core", "k"))
	mu := func(v intstr.IntOrString) v1.RolloutStrategy { return v1.RolloutStrategy{MaxUnavailable: &v} }
	moved := func(m map[string]Instance, n int, st Instance) map[string]Instance {
		for _, h := range order[:n] {
			m[h] = st
		}
		return m
	}
	inFlight := Instance{OnTarget: true, MovedAt: now.Add(-time.Minute)}
	doneInst := Instance{OnTarget: true, Aligned: true, AlignedAt: now.Add(-time.Minute)}
	failedInst := Instance{OnTarget: true, Degraded: true, Reason: "ProofFailed"}

	for _, tc := range []struct {
		name      string
		in        Input
		wantMove  int
		wantPhase v1.RolloutPhase
		check     func(t *testing.T, d Decision)
	}{
		{name: "new profile starts every host at once",
			in:       Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: map[string]Instance{}},
			wantMove: 10, wantPhase: v1.RolloutProgressing},
		{name: "maxUnavailable 1 moves one",
			in:       Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: serving(ten)},
			wantMove: 1, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				if d.Move[0] != order[0] {
					t.Errorf("moved %s, want the first in order %s", d.Move[0], order[0])
				}
			}},
		{name: "30% of 10 moves three",
			in:       Input{Strategy: mu(intstr.FromString("30%")), Hosts: ten, Instances: serving(ten)},
			wantMove: 3, wantPhase: v1.RolloutProgressing},
		{name: "in-flight hosts use capacity",
			in:       Input{Strategy: mu(intstr.FromInt32(3)), Hosts: ten, Instances: moved(serving(ten), 2, inFlight)},
			wantMove: 1, wantPhase: v1.RolloutProgressing},
		{name: "capacity full moves none",
			in:       Input{Strategy: mu(intstr.FromInt32(2)), Hosts: ten, Instances: moved(serving(ten), 2, inFlight)},
			wantMove: 0, wantPhase: v1.RolloutProgressing},
		{name: "done hosts free capacity",
			in:       Input{Strategy: mu(intstr.FromInt32(2)), Hosts: ten, Instances: moved(serving(ten), 4, doneInst)},
			wantMove: 2, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				if d.Updated != 4 || d.Pending != 6 {
					t.Errorf("updated %d pending %d", d.Updated, d.Pending)
				}
			}},
		{name: "unreachable hosts count as unavailable and move at once",
			in: func() Input {
				hs := hosts(10)
				for i := range hs {
					if hs[i].Name == order[9] || hs[i].Name == order[8] {
						hs[i].Reachable = false
					}
				}
				return Input{Strategy: mu(intstr.FromInt32(3)), Hosts: hs, Instances: serving(hs)}
			}(),
			// One serving host (3 - 2 unavailable) and the two that serve nothing.
			wantMove: 3, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				want := []string{order[0], order[8], order[9]}
				if !reflect.DeepEqual(d.Move, want) {
					t.Errorf("moved %v, want %v", d.Move, want)
				}
			}},
		{name: "a host failing on the old release counts against capacity and moves at once",
			in: func() Input {
				m := serving(ten)
				m[order[9]] = Instance{Degraded: true, Reason: "x"}
				return Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: m}
			}(),
			wantMove: 1, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				if d.Move[0] != order[9] {
					t.Errorf("moved %v, want the failing host %s", d.Move, order[9])
				}
			}},
		{name: "a host rolled back from an earlier target moves although failed hosts fill capacity",
			in: func() Input {
				m := serving(ten)
				// Failed on an earlier target: its spec still asks for that target.
				m[order[9]] = Instance{Degraded: true, Reason: "ProofFailed", MovedAt: now.Add(-time.Hour)}
				m[order[8]] = Instance{Degraded: true, Reason: "ProofFailed", MovedAt: now.Add(-time.Hour)}
				return Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: m, Started: now}
			}(),
			wantMove: 2, wantPhase: v1.RolloutProgressing},
		{name: "a failure from before the rollout began is applied again, not a halt",
			in: func() Input {
				m := serving(ten)
				m[order[0]] = Instance{OnTarget: true, Degraded: true, Reason: "ProofFailed", MovedAt: now.Add(-time.Hour)}
				return Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: m, Started: now.Add(-time.Minute)}
			}(),
			wantMove: 0, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				if !reflect.DeepEqual(d.Retry, []string{order[0]}) || d.Failed != 0 {
					t.Errorf("retry %v failed %d, want %s retried", d.Retry, d.Failed, order[0])
				}
			}},
		{name: "a rollback skips the canary step",
			in: Input{Strategy: v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(1)), Canary: &v1.CanaryStep{Hosts: ptr(intstr.FromInt32(1))}},
				Hosts: ten, Instances: moved(serving(ten), 1, doneInst), Rollback: true},
			wantMove: 1, wantPhase: v1.RolloutProgressing},
		{name: "a failed host halts the rollout",
			in:       Input{Strategy: mu(intstr.FromInt32(5)), Hosts: ten, Instances: moved(serving(ten), 1, failedInst)},
			wantMove: 0, wantPhase: v1.RolloutHalted,
			check: func(t *testing.T, d Decision) {
				if d.Failed != 1 || len(d.FailedHosts) != 1 || d.FailedHosts[0] != order[0]+": ProofFailed" {
					t.Errorf("failed = %d %v", d.Failed, d.FailedHosts)
				}
			}},
		{name: "past the progress deadline is a failure",
			in: Input{Strategy: v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(5)), ProgressDeadlineSeconds: 60},
				Hosts: ten, Instances: moved(serving(ten), 1, Instance{OnTarget: true, MovedAt: now.Add(-2 * time.Minute)})},
			wantMove: 0, wantPhase: v1.RolloutHalted},
		{name: "minReadySeconds keeps a host in flight",
			in: Input{Strategy: v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(1)), MinReadySeconds: 300},
				Hosts: ten, Instances: moved(serving(ten), 1, doneInst)},
			wantMove: 0, wantPhase: v1.RolloutProgressing,
			check: func(t *testing.T, d Decision) {
				if d.RequeueAfter <= 0 || d.RequeueAfter > 4*time.Minute+time.Second {
					t.Errorf("requeue after %v, want about 4m", d.RequeueAfter)
				}
			}},
		{name: "paused moves nothing",
			in:       Input{Strategy: v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(5)), Paused: true}, Hosts: ten, Instances: serving(ten)},
			wantMove: 0, wantPhase: v1.RolloutPaused},
		{name: "complete",
			in:       Input{Strategy: mu(intstr.FromInt32(1)), Hosts: ten, Instances: moved(serving(ten), 10, doneInst)},
			wantMove: 0, wantPhase: v1.RolloutComplete},
		{name: "unschedulable hosts are not moved",
			in: func() Input {
				hs := hosts(2)
				hs[0].Unschedulable, hs[1].Unschedulable = true, true
				return Input{Strategy: mu(intstr.FromInt32(2)), Hosts: hs, Instances: serving(hs)}
			}(),
			wantMove: 0, wantPhase: v1.RolloutComplete},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Profile, tc.in.Key, tc.in.Now = "core", "k", now
			d := Plan(tc.in)
			if len(d.Move) != tc.wantMove || d.Phase != tc.wantPhase {
				t.Fatalf("moved %v (%d), phase %s (%s); want %d, %s", d.Move, len(d.Move), d.Phase, d.Step, tc.wantMove, tc.wantPhase)
			}
			if tc.check != nil {
				tc.check(t, d)
			}
		})
	}
}

func TestPlanCanary(t *testing.T) {
	ten := hosts(10)
	strategy := v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(5)), Canary: &v1.CanaryStep{Hosts: ptr(intstr.FromString("20%"))}}
	in := Input{Profile: "core", Key: "k", Strategy: strategy, Hosts: ten, Instances: serving(ten), Now: now}

	d := Plan(in)
	if len(d.Move) != 2 || d.Phase != v1.RolloutProgressing {
		t.Fatalf("canary step moved %v, phase %s", d.Move, d.Phase)
	}
	canary := d.Move
	for _, h := range canary {
		in.Instances[h] = Instance{OnTarget: true, Aligned: true, AlignedAt: now}
	}
	d = Plan(in)
	if len(d.Move) != 0 || d.Phase != v1.RolloutPaused || !d.StartPause {
		t.Fatalf("after the canary: moved %v phase %s startPause %v", d.Move, d.Phase, d.StartPause)
	}
	paused := now
	in.PauseTime = &paused
	d = Plan(in)
	if len(d.Move) != 0 || d.Phase != v1.RolloutPaused || d.StartPause {
		t.Fatalf("while paused: moved %v phase %s", d.Move, d.Phase)
	}
	in.Promote = true
	d = Plan(in)
	if !d.EndPause || len(d.Move) != 5 || d.Phase != v1.RolloutProgressing {
		t.Fatalf("promoted: moved %v, want 5 (the canary hosts are available again), phase %s endPause %v", d.Move, d.Phase, d.EndPause)
	}
	for _, h := range d.Move {
		for _, c := range canary {
			if h == c {
				t.Errorf("moved canary host %s again", h)
			}
		}
	}

	// A timed pause ends by itself.
	in.Promote = false
	in.Strategy.Canary.PauseSeconds = ptr(int32(60))
	d = Plan(in)
	if d.EndPause || d.Phase != v1.RolloutPaused || d.RequeueAfter != 60*time.Second {
		t.Fatalf("timed pause: %+v", d)
	}
	in.Now = now.Add(61 * time.Second)
	d = Plan(in)
	if !d.EndPause || d.Phase != v1.RolloutProgressing {
		t.Fatalf("timed pause over: %+v", d)
	}

	// During the canary step a host that serves nothing moves too: it risks no availability,
	// and it would otherwise hold capacity the canary needs.
	in = Input{Profile: "core", Key: "k", Strategy: v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromInt32(1)),
		Canary: &v1.CanaryStep{Hosts: ptr(intstr.FromInt32(1))}}, Hosts: ten, Instances: serving(ten), Now: now}
	order := names(Order(ten, "core", "k"))
	delete(in.Instances, order[5])
	d = Plan(in)
	if !reflect.DeepEqual(d.Move, []string{order[5]}) {
		t.Fatalf("canary step with a new host moved %v, want the new host %s (the canary waits for it)", d.Move, order[5])
	}

	// A failed canary halts before anything else moves.
	in = Input{Profile: "core", Key: "k", Strategy: strategy, Hosts: ten, Instances: serving(ten), Now: now}
	in.Instances[canary[0]] = Instance{OnTarget: true, Degraded: true, Reason: "ProofFailed"}
	d = Plan(in)
	if d.Phase != v1.RolloutHalted || len(d.Move) != 0 {
		t.Fatalf("failed canary: %+v", d)
	}
}

// TestPlanNeverExceedsCapacity replays a rollout step by step, where every moved host takes two
// steps to become available, and checks the in-flight count never exceeds maxUnavailable.
func TestPlanNeverExceedsCapacity(t *testing.T) {
	for _, n := range []int{1, 7, 50, 1000} {
		hs := hosts(n)
		inst := serving(hs)
		strategy := v1.RolloutStrategy{MaxUnavailable: ptr(intstr.FromString("10%"))}
		limit := Scaled(strategy.MaxUnavailable, n, 1)
		age := map[string]int{}
		for step := 0; step < 10*n; step++ {
			d := Plan(Input{Profile: "core", Key: "k", Strategy: strategy, Hosts: hs, Instances: inst, Now: now})
			if d.Phase == v1.RolloutComplete {
				break
			}
			for _, h := range d.Move {
				inst[h] = Instance{OnTarget: true, MovedAt: now}
				age[h] = 0
			}
			inFlight := 0
			for h, i := range inst {
				if i.OnTarget && !i.Aligned {
					inFlight++
					if age[h]++; age[h] >= 2 {
						inst[h] = Instance{OnTarget: true, Aligned: true, AlignedAt: now.Add(-time.Hour)}
					}
				}
			}
			if inFlight > limit {
				t.Fatalf("%d hosts: %d in flight at step %d, limit %d", n, inFlight, step, limit)
			}
		}
		if d := Plan(Input{Profile: "core", Key: "k", Strategy: strategy, Hosts: hs, Instances: inst, Now: now}); d.Phase != v1.RolloutComplete {
			t.Errorf("%d hosts: rollout did not complete: %s", n, d.Step)
		}
	}
}
