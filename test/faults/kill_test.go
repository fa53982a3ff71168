package faults

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/stack"
)

// leader returns the index of the manager replica that holds the lease (the last one whose log
// says it acquired it), or -1.
func leader(s *stack.Stack, replicas int, except int) int {
	for i := range replicas {
		if i != except && strings.Contains(s.Log(stack.ManagerName(i)), "Successfully acquired lease") {
			return i
		}
	}
	return -1
}

// TestLeaderKilledMidRollout runs two manager replicas and kills the leader (SIGKILL: no lease
// released) just after the rollout moved its first host. The other replica takes over once the
// lease runs out and finishes the rollout: never more than maxUnavailable hosts unavailable, no
// host moved twice.
func TestLeaderKilledMidRollout(t *testing.T) {
	s := up(t, stack.Options{Hosts: []string{"lead-a", "lead-b", "lead-c"}, ManagerReplicas: 2})
	good1 := publish(t, s, agentruntime.Options{Version: "1.0.0"})
	good2 := publish(t, s, agentruntime.Options{Version: "2.0.0"})
	applyProfile(t, s, good1, 5)
	complete(t, s, "1.0.0", 2*time.Minute)
	old := leader(s, 2, -1)
	if old < 0 {
		t.Fatal("no manager replica says it holds the lease")
	}

	w := watchFleet(t, s)
	applyProfile(t, s, good2, 5)
	firstMove(t, w, "2.0.0")
	if err := s.Kill(stack.ManagerName(old)); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	poll.Until(t, "the other replica to take the lease", time.Minute, func() (bool, string) {
		return leader(s, 2, old) >= 0, "not yet"
	})
	t.Logf("recovery: %s killed; the other replica leads %s later (lease duration 15 s)", stack.ManagerName(old), time.Since(killed).Round(100*time.Millisecond))
	complete(t, s, "2.0.0", 3*time.Minute)
	t.Logf("recovery: the rollout complete %s after the leader was killed", time.Since(killed).Round(100*time.Millisecond))
	w.check(t, 1)
	for i, m := range w.movesTo("2.0.0") {
		t.Logf("move %d: %s", i+1, m)
	}
}

// TestAgentKilledMidApply kills (SIGKILL) the node agent of the first host the rollout moves,
// as soon as the move is out, while it applies, and starts it again. The host converges: its
// gateway serves the target, proven, and nothing of the interrupted apply is left behind.
func TestAgentKilledMidApply(t *testing.T) {
	s := up(t, stack.Options{Hosts: []string{"kill-a", "kill-b"}})
	good1 := publish(t, s, agentruntime.Options{Version: "1.0.0"})
	good2 := publish(t, s, agentruntime.Options{Version: "2.0.0"})
	applyProfile(t, s, good1, 0)
	complete(t, s, "1.0.0", 2*time.Minute)
	before := gateways(t, s)

	w := watchFleet(t, s)
	applyProfile(t, s, good2, 0)
	firstMove(t, w, "2.0.0")
	host := w.firstMoved("2.0.0")
	if err := s.Kill(stack.AgentName(host)); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	h := s.Hosts[host]
	p, err := layout.ForProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	current, _ := os.Readlink(layout.Host{Root: h.Root}.On(p.Current))
	t.Logf("agent of %s killed; its gateway then: %s (was %s), current -> %s", host, gateways(t, s)[host], before[host], filepath.Base(current))
	time.Sleep(2 * time.Second)
	if err := s.Start(stack.AgentName(host)); err != nil {
		t.Fatal(err)
	}
	complete(t, s, "2.0.0", 3*time.Minute)
	t.Logf("recovery: the rollout complete %s after the agent was killed", time.Since(killed).Round(100*time.Millisecond))
	w.check(t, 1)

	after := gateways(t, s)
	for name := range s.Hosts {
		if !strings.HasSuffix(after[name], "version 2.0.0") {
			t.Errorf("%s does not serve 2.0.0: %s", name, after[name])
		}
	}
	releases := layout.Host{Root: h.Root}.On(layout.ReleasesDir)
	entries, err := os.ReadDir(releases)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") || strings.HasPrefix(e.Name(), ".download-") {
			t.Errorf("%s: the interrupted apply left %s in %s", host, e.Name(), layout.ReleasesDir)
		}
	}
	current, err = os.Readlink(layout.Host{Root: h.Root}.On(p.Current))
	if err != nil || !strings.HasSuffix(current, "-2.0.0") {
		t.Errorf("%s: current -> %q (%v), want the 2.0.0 release", host, current, err)
	}
}
