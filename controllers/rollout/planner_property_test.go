package rollout

import (
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// The property test drives the planner the way the controller does, over random fleets,
// starting states, faults and operator actions, with agents simulated step by step (one step is
// one second and one planner call). At every step it checks safety: no more than maxUnavailable
// of the serving hosts are moving at once, canary hosts move first, a halted or paused rollout
// moves nothing. Then the faults stop and it checks liveness: with a good target and healthy
// agents the rollout completes within a bound, and a rollback to the last good release
// completes with no operator action at all.
//
// ROLLOUT_PROPERTY_RUNS sets the number of random fleets (default 150); ROLLOUT_PROPERTY_SEED
// the first seed, to replay a failure.

// keys are the targets of the simulated profile: key 0 and 1 are good releases, key 2 fails on
// every host, key 3 is good or bad by the seed.
const nKeys = 4

type simHost struct {
	Host
	exists  bool
	spec    int       // the key the instance asks for
	movedAt time.Time // the controller's moved-at stamp
	// What the agent last reported; fresh is false while the agent has not yet seen the spec.
	fresh, aligned, degraded bool
	alignedAt                time.Time
	applyAt                  int // the step at which the agent has applied, -1 for none
	// movedServing marks a host that served when it was moved and has not served since.
	movedServing bool
}

type sim struct {
	t    *testing.T
	rng  *rand.Rand
	seed int64
	good [nKeys]bool
	hs   []*simHost
	s    v1.RolloutStrategy
	maxU int
	step int
	t0   time.Time
	// The rollout status the controller keeps.
	target, from      int
	started           time.Time
	pauseTime         *time.Time
	promoted, aborted bool
	phase             v1.RolloutPhase
	rollback          bool
	// flaky is the chance that an apply fails although the release is good.
	flaky float64
}

func (m *sim) now() time.Time { return m.t0.Add(time.Duration(m.step) * time.Second) }

func (m *sim) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("seed %d, %d hosts, step %d: %s", m.seed, len(m.hs), m.step, fmt.Sprintf(format, args...))
}

func newSim(t *testing.T, seed int64) *sim {
	rng := rand.New(rand.NewSource(seed)) //nolint:gosec // a seeded, replayable test fleet
	m := &sim{t: t, rng: rng, seed: seed, t0: time.Unix(2_000_000, 0), phase: v1.RolloutProgressing}
	m.good = [nKeys]bool{true, true, false, rng.Intn(2) == 0}
	n := 1 + rng.Intn(200)
	if rng.Intn(4) == 0 {
		n = 1 + rng.Intn(5)
	}
	mus := []intstr.IntOrString{intstr.FromInt32(1), intstr.FromInt32(2), intstr.FromString("10%"), intstr.FromString("25%"), intstr.FromString("50%")}
	mu := mus[rng.Intn(len(mus))]
	m.s = v1.RolloutStrategy{MaxUnavailable: &mu, ProgressDeadlineSeconds: int32(20 + rng.Intn(20)), MinReadySeconds: int32(rng.Intn(3))}
	m.maxU = Scaled(m.s.MaxUnavailable, n, 1)
	if rng.Intn(2) == 0 {
		c := &v1.CanaryStep{Hosts: ptr(intstr.FromInt32(1))}
		if rng.Intn(2) == 0 {
			c.Hosts = ptr(intstr.FromString("10%"))
		}
		if rng.Intn(2) == 0 {
			c.PauseSeconds = ptr(int32(5))
		}
		m.s.Canary = c
	}
	m.target = rng.Intn(nKeys)
	m.from = 0
	m.started = m.t0.Add(-time.Duration(rng.Intn(100)) * time.Second)
	m.promoted = rng.Intn(3) == 0
	m.flaky = 0.1
	for i := 0; i < n; i++ {
		h := &simHost{Host: Host{Name: fmt.Sprintf("h%03d", i), Reachable: true}, applyAt: -1}
		// Host 0 is never cordoned, so a rollout has somewhere to go.
		h.Unschedulable = i > 0 && rng.Intn(20) == 0
		h.Reachable = rng.Intn(10) != 0
		h.exists = true
		h.movedAt = m.t0.Add(-time.Duration(rng.Intn(120)) * time.Second)
		switch rng.Intn(6) {
		case 0: // never ran the profile
			h.exists = false
		case 1: // serving the old release
			h.spec, h.fresh, h.aligned, h.alignedAt = 0, true, true, m.t0.Add(-time.Hour)
		case 2: // serving the target, if it is good; else rolled back from it
			h.spec, h.fresh = m.target, true
			h.aligned, h.degraded = m.good[m.target], !m.good[m.target]
			h.alignedAt = m.t0.Add(-time.Minute)
		case 3: // moving to some release
			h.spec, h.applyAt = rng.Intn(nKeys), rng.Intn(4)
		default: // failed, or rolled back from some release
			h.spec, h.fresh, h.degraded = rng.Intn(nKeys), true, true
		}
		m.hs = append(m.hs, h)
	}
	return m
}

func (m *sim) key(k int) string { return fmt.Sprintf("key-%d", k) }

func (m *sim) serving(h *simHost) bool {
	return h.Reachable && h.exists && h.fresh && h.aligned && !h.degraded
}

// instance is what the controller reads of a host's instance (instanceFacts).
func (m *sim) instance(h *simHost) Instance {
	f := Instance{OnTarget: h.spec == m.target, MovedAt: h.movedAt}
	if h.fresh {
		f.Aligned, f.AlignedAt, f.Degraded = h.aligned, h.alignedAt, h.degraded
		if h.degraded {
			f.Reason = "ProofFailed"
		}
	}
	return f
}

// setTarget is a change of spec.release: a new rollout, as the controller begins one.
func (m *sim) setTarget(k int) {
	if k == m.target {
		return
	}
	if m.phase == v1.RolloutComplete {
		m.from = m.target
	}
	// The controller's rollingBack: back to where the unfinished rollout started from.
	m.rollback = m.phase != v1.RolloutComplete && k == m.from
	m.target, m.started = k, m.now()
	m.pauseTime, m.promoted, m.aborted, m.phase = nil, false, false, v1.RolloutProgressing
}

// moveTo points a host's instance at a key, as the controller's moveAll does.
func (m *sim) moveTo(h *simHost, k int) {
	if h.exists && h.spec == k {
		return
	}
	h.exists, h.spec, h.movedAt = true, k, m.now()
	h.fresh, h.aligned, h.degraded = false, false, false
	h.applyAt = m.step + 1 + m.rng.Intn(3)
}

// retry is the retry annotation: the agent applies again (unless it is still applying); its
// report stays until then.
func (m *sim) retry(h *simHost) {
	h.movedAt = m.now()
	if h.applyAt < 0 {
		h.applyAt = m.step + 1 + m.rng.Intn(3)
	}
}

// resume is the controller's retryFailed.
func (m *sim) resume() {
	deadline := time.Duration(m.s.ProgressDeadlineSeconds) * time.Second
	for _, h := range m.hs {
		f := m.instance(h)
		late := f.OnTarget && !f.Aligned && m.now().Sub(f.MovedAt) > deadline
		if h.exists && f.OnTarget && (f.Degraded || late) {
			m.retry(h)
		}
	}
}

// abort returns every host to the release the rollout started from, at once.
func (m *sim) abort() {
	m.aborted, m.phase = true, v1.RolloutAborted
	for _, h := range m.hs {
		if h.exists {
			m.moveTo(h, m.from)
		}
	}
}

// agents finish the applies that are due on reachable hosts.
func (m *sim) agents() {
	for _, h := range m.hs {
		if h.applyAt < 0 || h.applyAt > m.step || !h.Reachable {
			continue
		}
		h.applyAt, h.fresh = -1, true
		if m.good[h.spec] && m.rng.Float64() >= m.flaky {
			h.aligned, h.degraded, h.alignedAt = true, false, m.now()
			h.movedServing = false
		} else {
			h.aligned, h.degraded = false, true // rolled back to the last good release
		}
	}
}

// plan runs the planner once, checks the decision's safety and carries it out.
func (m *sim) plan(promote bool) Decision {
	m.t.Helper()
	in := Input{Profile: "p", Key: m.key(m.target), Strategy: m.s, Now: m.now(), Instances: map[string]Instance{},
		Promoted: m.promoted, Promote: promote, Started: m.started, Rollback: m.rollback, PauseTime: m.pauseTime}
	byName := map[string]*simHost{}
	notServing := 0
	for _, h := range m.hs {
		in.Hosts = append(in.Hosts, h.Host)
		byName[h.Name] = h
		if h.exists {
			in.Instances[h.Name] = m.instance(h)
		}
		if !m.serving(h) && !h.Unschedulable {
			notServing++
		}
	}
	d := Plan(in)

	moved := append(append([]string(nil), d.Move...), d.Retry...)
	servingMoves := 0
	for _, name := range moved {
		h := byName[name]
		if h.Unschedulable {
			m.fail("moved cordoned host %s", name)
		}
		if m.serving(h) {
			servingMoves++
		}
	}
	if servingMoves > 0 && servingMoves > m.maxU-notServing {
		m.fail("moved %d serving hosts with %d of %d hosts not serving, maxUnavailable %d", servingMoves, notServing, len(m.hs), m.maxU)
	}
	if len(moved) > 0 && (d.Phase == v1.RolloutHalted || m.s.Paused) {
		m.fail("moved %v while %s (%s)", moved, d.Phase, d.Step)
	}
	if m.s.Canary != nil && !m.rollback && !m.promoted && !d.EndPause && len(moved) > 0 {
		canary := map[string]bool{}
		for i, h := range Order(in.Hosts, "p", in.Key) {
			canary[h.Name] = i < Scaled(m.s.Canary.Hosts, len(m.hs), 1)
		}
		for _, name := range moved {
			if !canary[name] && m.serving(byName[name]) {
				m.fail("moved serving host %s before the canary hosts were promoted", name)
			}
		}
	}

	for _, name := range d.Move {
		h := byName[name]
		if m.serving(h) {
			h.movedServing = true
		}
		m.moveTo(h, m.target)
	}
	for _, name := range d.Retry {
		m.retry(byName[name])
	}
	if d.StartPause {
		t := m.now()
		m.pauseTime = &t
	}
	if d.EndPause {
		m.promoted = true
	}
	m.phase = d.Phase
	moving := 0
	for _, h := range m.hs {
		if h.movedServing {
			moving++
		}
	}
	if moving > m.maxU {
		m.fail("%d hosts moved while serving are not serving yet, maxUnavailable %d", moving, m.maxU)
	}
	return d
}

// chaos runs steps with faults and random operator actions.
func (m *sim) chaos(steps int) {
	for ; steps > 0; steps-- {
		m.step++
		promote := false
		switch r := m.rng.Intn(100); {
		case r < 3:
			m.setTarget(m.rng.Intn(nKeys))
		case r < 5:
			promote = true
		case r < 7:
			if !m.aborted {
				m.resume()
				m.agents()
				continue // the controller acts on a resume alone
			}
		case r < 8:
			if !m.aborted {
				m.abort()
			}
		case r < 10:
			m.s.Paused = !m.s.Paused
		}
		for i := m.rng.Intn(3); i > 0; i-- {
			if m.rng.Intn(10) == 0 {
				h := m.hs[m.rng.Intn(len(m.hs))]
				h.Reachable = !h.Reachable
			}
		}
		if !m.aborted {
			m.plan(promote)
		}
		m.agents()
	}
}

// calm ends the faults: every host is reachable, every apply of a good release succeeds.
func (m *sim) calm() {
	m.flaky = 0
	for _, h := range m.hs {
		h.Reachable = true
	}
}

// bound is a generous number of steps for a rollout to complete: a wave per maxUnavailable
// hosts (and one for the canary), each taking the agents' delay, minReadySeconds and a
// canary pause at most.
func (m *sim) bound() int {
	waves := (len(m.hs)+m.maxU-1)/m.maxU + 2
	return waves*(4+int(m.s.MinReadySeconds)+2) + 10 + int(m.s.ProgressDeadlineSeconds)
}

// converge runs steps until the rollout completes, with the operator doing what the docs say
// when asked (promote a paused canary, resume a halt) if operate is set.
func (m *sim) converge(operate bool, what string) {
	limit := m.bound()
	for i := 0; i < limit; i++ {
		m.step++
		promote := false
		if operate && m.phase == v1.RolloutPaused && m.pauseTime != nil {
			promote = true
		}
		if operate && m.phase == v1.RolloutHalted {
			m.resume()
			m.agents()
			m.phase = v1.RolloutProgressing
			continue
		}
		d := m.plan(promote)
		m.agents()
		if d.Phase == v1.RolloutComplete {
			for _, h := range m.hs {
				if !h.Unschedulable && (!h.exists || h.spec != m.target || !m.serving(h)) {
					m.fail("%s: complete, but %s is not serving the target", what, h.Name)
				}
			}
			if !m.good[m.target] {
				m.fail("%s: complete on a bad release", what)
			}
			return
		}
	}
	m.fail("%s: not complete within %d steps: %s", what, limit, m.phase)
}

func TestPlanProperties(t *testing.T) {
	runs, first := 150, int64(1)
	if v, err := strconv.Atoi(os.Getenv("ROLLOUT_PROPERTY_RUNS")); err == nil {
		runs = v
	}
	if v, err := strconv.ParseInt(os.Getenv("ROLLOUT_PROPERTY_SEED"), 10, 64); err == nil {
		first = v
	}
	for seed := first; seed < first+int64(runs); seed++ {
		m := newSim(t, seed)
		m.chaos(m.rng.Intn(80))
		m.calm()
		// The last good release is where the unfinished rollout started from.
		if m.phase != v1.RolloutComplete && m.target != m.from && m.rng.Intn(2) == 0 {
			// The documented rollback: spec.release back to the last good release (and not
			// paused). No promote, no resume.
			m.s.Paused = false
			m.setTarget(m.from)
			if !m.rollback {
				m.fail("a return to %s is not a rollback", m.key(m.from))
			}
			m.converge(false, "rollback to the last good release")
			continue
		}
		// A good target: the operator unpauses, promotes the canary, resumes after a halt.
		m.s.Paused = false
		k := []int{0, 1}[m.rng.Intn(2)]
		if m.aborted && k == m.target {
			k = 1 - k // an aborted rollout waits for a new target
		}
		if m.good[m.target] && !m.aborted && m.rng.Intn(2) == 0 {
			k = m.target
		}
		m.setTarget(k)
		m.converge(true, "good target "+m.key(k))
	}
}
