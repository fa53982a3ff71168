// Package rollout decides, as a pure function of what the cluster says now, which hosts move to
// a profile's target next. Nothing is remembered between calls but what the caller passes in,
// all of which lives in the API server (instances' specs and status, the profile's status), so
// a restarted controller continues exactly where the last one stopped, with the same number of
// hosts in flight.
package rollout

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Host is one selected host.
type Host struct {
	Name string
	// Reachable is false when the host's heartbeat is stale: it counts as unavailable.
	Reachable bool
	// Unschedulable hosts are never moved.
	Unschedulable bool
	// Canary marks a host picked by the canary selector.
	Canary bool
}

// Instance is what the controller read of one host's instance.
type Instance struct {
	// OnTarget is true when the instance's spec already asks for the target.
	OnTarget bool
	// MovedAt is when its spec was moved to the target (zero if unknown).
	MovedAt time.Time
	// Aligned is true when the agent proved the instance's current spec.
	Aligned bool
	// AlignedAt is when it became aligned.
	AlignedAt time.Time
	// Degraded is true when the agent reports a failure; Reason says what.
	Degraded bool
	Reason   string
}

// Input is everything a decision depends on.
type Input struct {
	Profile string
	// Key identifies the target (release and settings).
	Key      string
	Strategy v1.RolloutStrategy
	// Hosts are the selected hosts; Instances their instances by host name (absent: none yet).
	Hosts     []Host
	Instances map[string]Instance
	Now       time.Time
	// PauseTime is when the canary pause began; Promoted whether it ended.
	PauseTime *time.Time
	Promoted  bool
	// Promote is true when a person asked to end the canary pause now.
	Promote bool
	// Started is when this rollout began: a failure of a host moved before then belongs to an
	// earlier rollout and does not halt this one; the host is applied again.
	Started time.Time
	// Rollback is true when the target is the last release this profile completed a rollout
	// to: it was proven on these hosts already, so there is no canary step.
	Rollback bool
}

// Decision is what to do next and how to report it.
type Decision struct {
	// Move lists the hosts whose instance moves to the target now, in rollout order.
	Move []string
	// Retry lists hosts already asked for the target that failed before this rollout began:
	// their agents apply the target again now.
	Retry []string
	Phase v1.RolloutPhase
	Step  string
	// Updated, Pending and Failed count hosts; FailedHosts says which failed and why.
	Updated, Pending, Failed int
	FailedHosts              []string
	// StartPause is true when the canary pause begins now; EndPause when it ends now.
	StartPause, EndPause bool
	// RequeueAfter asks to be called again (a pause or a deadline runs out), 0 for never.
	RequeueAfter time.Duration
}

// Scaled resolves a number-or-percentage against a total: percentages round down, the result is
// at least 1 (a rollout always makes progress) and at most total.
func Scaled(v *intstr.IntOrString, total int, def int) int {
	n := def
	if v != nil {
		if v.Type == intstr.String {
			var pct int
			if _, err := fmt.Sscanf(strings.TrimSuffix(v.StrVal, "%"), "%d", &pct); err == nil {
				n = int(math.Floor(float64(total) * float64(pct) / 100))
			}
		} else {
			n = v.IntValue()
		}
	}
	if n < 1 {
		n = 1
	}
	if total > 0 && n > total {
		n = total
	}
	return n
}

// Order sorts hosts for a rollout: canary hosts first, then by a hash of host, profile and
// target, so the order is stable while a rollout runs and differs between profiles and targets
// (no host is always first).
func Order(hosts []Host, profile, key string) []Host {
	type ranked struct {
		Host
		rank uint64
	}
	rs := make([]ranked, len(hosts))
	for i, h := range hosts {
		sum := sha256.Sum256([]byte(h.Name + "/" + profile + "/" + key))
		rs[i] = ranked{h, binary.BigEndian.Uint64(sum[:8])}
	}
	sort.Slice(rs, func(i, j int) bool {
		if rs[i].Canary != rs[j].Canary {
			return rs[i].Canary
		}
		if rs[i].rank != rs[j].rank {
			return rs[i].rank < rs[j].rank
		}
		return rs[i].Name < rs[j].Name
	})
	out := make([]Host, len(rs))
	for i, r := range rs {
		out[i] = r.Host
	}
	return out
}

type state int

const (
	pending  state = iota // not on the target yet
	inFlight              // moved, not yet aligned long enough
	done                  // moved and available
	failed                // moved and failed, or past its deadline
	stale                 // on the target, but failed in an earlier rollout: applied again
)

// Plan decides the next step of a rollout.
func Plan(in Input) Decision {
	s := in.Strategy
	deadline := time.Duration(s.ProgressDeadlineSeconds) * time.Second
	if deadline == 0 {
		deadline = 600 * time.Second
	}
	minReady := time.Duration(s.MinReadySeconds) * time.Second
	hosts := Order(in.Hosts, in.Profile, in.Key)

	// Canary hosts: those the selector picked, or the first N of the order.
	if s.Canary != nil && s.Canary.Selector == nil {
		n := Scaled(s.Canary.Hosts, len(hosts), 1)
		for i := range hosts {
			hosts[i].Canary = i < n
		}
	}

	var d Decision
	var requeue []time.Duration
	states := make(map[string]state, len(hosts))
	// serving marks the hosts that serve a release now; any other host may move at any time,
	// since moving it costs no availability (the way a DaemonSet replaces unavailable pods
	// first).
	serving := make(map[string]bool, len(hosts))
	unavailable, inFlights := 0, 0
	for _, h := range hosts {
		inst, exists := in.Instances[h.Name]
		earlier := !in.Started.IsZero() && inst.MovedAt.Before(in.Started)
		st := pending
		switch {
		case exists && inst.OnTarget && inst.Degraded && earlier:
			st = stale
		case exists && inst.OnTarget && inst.Degraded:
			st = failed
			d.FailedHosts = append(d.FailedHosts, h.Name+": "+inst.Reason)
		case exists && inst.OnTarget && inst.Aligned:
			if ready := inst.AlignedAt.Add(minReady); in.Now.Before(ready) {
				st = inFlight
				requeue = append(requeue, ready.Sub(in.Now))
			} else {
				st = done
			}
		case exists && inst.OnTarget:
			switch {
			case !inst.MovedAt.IsZero() && in.Now.Sub(inst.MovedAt) > deadline && earlier:
				st = stale
			case !inst.MovedAt.IsZero() && in.Now.Sub(inst.MovedAt) > deadline:
				st = failed
				d.FailedHosts = append(d.FailedHosts, fmt.Sprintf("%s: not aligned within %s", h.Name, deadline))
			default:
				st = inFlight
				if !inst.MovedAt.IsZero() {
					requeue = append(requeue, inst.MovedAt.Add(deadline).Sub(in.Now)+time.Second)
				}
			}
		}
		states[h.Name] = st
		switch st {
		case done:
			d.Updated++
			if h.Reachable {
				serving[h.Name] = true
			} else {
				unavailable++
			}
		case inFlight:
			d.Updated++
			inFlights++
			unavailable++
		case failed:
			d.Updated++
			d.Failed++
			unavailable++
		case stale:
			d.Pending++
			unavailable++
		case pending:
			d.Pending++
			// A host not serving the old release either (never started, failing, rolled back,
			// unreachable) is already unavailable.
			if h.Reachable && exists && inst.Aligned && !inst.Degraded {
				serving[h.Name] = true
			} else {
				unavailable++
			}
		}
	}
	// A cordoned host is out of service by a person's decision: the rollout neither moves it
	// nor lets it hold capacity that no rollout step could ever free.
	for _, h := range hosts {
		if h.Unschedulable && !serving[h.Name] {
			unavailable--
		}
	}
	if len(requeue) > 0 {
		d.RequeueAfter = requeue[0]
		for _, r := range requeue {
			d.RequeueAfter = min(d.RequeueAfter, r)
		}
	}
	capacity := Scaled(s.MaxUnavailable, len(hosts), 1) - unavailable

	// move takes the hosts still to move in order: those that serve nothing at once (even
	// during the canary step: they risk no availability), those that serve while capacity
	// lasts and the step lets them (servingToo: all, canary hosts only, or none).
	const (
		servingNone = iota
		servingCanary
		servingAll
	)
	move := func(servingToo int) {
		for _, h := range hosts {
			st := states[h.Name]
			if (st != pending && st != stale) || h.Unschedulable {
				continue
			}
			if serving[h.Name] {
				if servingToo == servingNone || (servingToo == servingCanary && !h.Canary) || capacity <= 0 {
					continue
				}
				capacity--
			}
			if st == stale {
				d.Retry = append(d.Retry, h.Name)
			} else {
				d.Move = append(d.Move, h.Name)
			}
		}
	}
	movable := 0
	for _, h := range hosts {
		if st := states[h.Name]; (st == pending || st == stale) && !h.Unschedulable {
			movable++
		}
	}
	canary := s.Canary != nil && !in.Rollback

	switch {
	case d.Failed > 0:
		d.Phase = v1.RolloutHalted
		d.Step = fmt.Sprintf("halted: %d host(s) failed; no further host is moved", d.Failed)
		d.Move = nil
	case movable == 0 && inFlights == 0:
		d.Phase = v1.RolloutComplete
		d.Step = fmt.Sprintf("%d of %d hosts updated and available", d.Updated, len(hosts))
	case s.Paused:
		d.Phase = v1.RolloutPaused
		d.Step = "paused by spec.rollout.paused"
	case canary && !in.Promoted && !canaryDone(hosts, states):
		move(servingCanary)
		d.Phase = v1.RolloutProgressing
		d.Step = fmt.Sprintf("canary: %d of %d canary hosts available", countCanary(hosts, states, done), countCanary(hosts, states, -1))
	case canary && !in.Promoted:
		// The canary hosts are available: pause, until promoted or until the pause runs out.
		switch {
		case in.Promote:
			d.EndPause = true
		case in.PauseTime == nil:
			d.StartPause = true
		case s.Canary.PauseSeconds != nil:
			end := in.PauseTime.Add(time.Duration(*s.Canary.PauseSeconds) * time.Second)
			if !in.Now.Before(end) {
				d.EndPause = true
			} else {
				d.RequeueAfter = end.Sub(in.Now)
			}
		}
		if !d.EndPause {
			move(servingNone)
			d.Phase = v1.RolloutPaused
			if s.Canary.PauseSeconds == nil {
				d.Step = "canary available; paused until promoted (annotate gateway.agent.dev/promote)"
			} else {
				d.Step = fmt.Sprintf("canary available; paused for %ds", *s.Canary.PauseSeconds)
			}
			break
		}
		fallthrough
	default:
		move(servingAll)
		d.Phase = v1.RolloutProgressing
		d.Step = fmt.Sprintf("%d of %d hosts updated, %d moving now", d.Updated, len(hosts), len(d.Move)+len(d.Retry))
	}
	sort.Strings(d.FailedHosts)
	return d
}

func canaryDone(hosts []Host, states map[string]state) bool {
	for _, h := range hosts {
		if h.Canary && !h.Unschedulable && states[h.Name] != done {
			return false
		}
	}
	return true
}

// countCanary counts canary hosts in a state, or all of them for want < 0.
func countCanary(hosts []Host, states map[string]state, want state) int {
	n := 0
	for _, h := range hosts {
		if h.Canary && (want < 0 || states[h.Name] == want) {
			n++
		}
	}
	return n
}
