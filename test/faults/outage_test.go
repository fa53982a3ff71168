package faults

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/poll"

	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/stack"
)

// outage is how long the API server stays down mid-rollout: well past the hosts' grace period,
// the leader lease and the agents' and manager's client back-offs.
const outage = 5 * time.Minute

// TestAPIServerOutageMidRollout stops kube-apiserver (etcd and its data stay) just after the
// rollout moved its first host, for five minutes, and starts it again on the same address.
// Meanwhile every gateway keeps running its release, with no restart. Afterwards the agents
// and the manager come back by themselves, and the rollout resumes and completes without ever
// having more than maxUnavailable hosts unavailable.
func TestAPIServerOutageMidRollout(t *testing.T) {
	s := up(t, stack.Options{Hosts: []string{"out-a", "out-b", "out-c"}})
	good1 := publish(t, s, agentruntime.Options{Version: "1.0.0"})
	good2 := publish(t, s, agentruntime.Options{Version: "2.0.0"})
	applyProfile(t, s, good1, 5)
	complete(t, s, "1.0.0", 2*time.Minute)
	before := gateways(t, s)

	w := watchFleet(t, s)
	applyProfile(t, s, good2, 5)
	firstMove(t, w, "2.0.0")
	if err := s.CP.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	t.Logf("kube-apiserver stopped after the first move; gateways before the rollout: %v", before)

	// The moved host's agent may be in the middle of its apply: let it finish, then nothing
	// on any host may change while the API server is away.
	time.Sleep(30 * time.Second)
	during := gateways(t, s)
	t.Logf("gateways 30 s into the outage: %v", during)
	changed := 0
	for host := range s.Hosts {
		if during[host] != before[host] {
			changed++
		}
	}
	if changed > 1 {
		t.Errorf("%d hosts changed while the API server was away, at most the moved one may: %v -> %v", changed, before, during)
	}
	for time.Since(down) < outage {
		time.Sleep(min(15*time.Second, outage-time.Since(down)))
		if now := gateways(t, s); !equal(now, during) {
			t.Fatalf("a gateway changed %s into the outage: %v -> %v", time.Since(down).Round(time.Second), during, now)
		}
	}
	if err := s.CP.StartAPIServer(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	t.Logf("kube-apiserver started again after %s", back.Sub(down).Round(time.Second))

	t.Logf("recovery: every agent heart-beating again %s after the API server came back", heartbeatsAfter(t, s, back).Round(100*time.Millisecond))
	moved := w.firstMoved("2.0.0")
	poll.Until(t, moved+"'s proof of 2.0.0 reported", 5*time.Minute, func() (bool, string) {
		var gi v1.GatewayInstance
		if err := s.CP.Client.Get(context.Background(), client.ObjectKey{Name: profile + "." + moved}, &gi); err != nil {
			return false, err.Error()
		}
		return !unavailable(&gi), fmt.Sprintf("%+v", gi.Status.Conditions)
	})
	t.Logf("recovery: %s's proof, made during the outage, reported %s after the API server came back", moved, time.Since(back).Round(100*time.Millisecond))
	complete(t, s, "2.0.0", 5*time.Minute)
	t.Logf("recovery: the rollout complete %s after the API server came back", time.Since(back).Round(100*time.Millisecond))
	for i, m := range w.movesTo("2.0.0") {
		t.Logf("move %d: %s", i+1, m)
	}
	t.Logf("recovery: the manager leading again %s after the API server came back; it was started again %d time(s), as it exits when it cannot renew its lease",
		leadingSince(t, s.Log(stack.ManagerName(0))).Sub(back.Truncate(time.Second)), s.Restarts(stack.ManagerName(0)))
	w.check(t, 1)
	after := gateways(t, s)
	for host := range s.Hosts {
		switch {
		case after[host] == before[host]:
			t.Errorf("%s was not moved: %s", host, after[host])
		case during[host] != before[host] && after[host] != during[host]:
			t.Errorf("%s, moved before the outage, was restarted again after it: %s -> %s", host, during[host], after[host])
		}
	}
}

func equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// leadingSince returns when a manager's log last says it acquired the lease (to the second).
func leadingSince(t *testing.T, log string) time.Time {
	t.Helper()
	var at time.Time
	for _, line := range strings.Split(log, "\n") {
		var e struct {
			TS  string `json:"ts"`
			Msg string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == "Successfully acquired lease" {
			if ts, err := time.Parse(time.RFC3339, e.TS); err == nil {
				at = ts
			}
		}
	}
	if at.IsZero() {
		t.Error("the manager's log never says it acquired the lease")
	}
	return at
}
