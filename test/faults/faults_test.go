// Package faults breaks the running system on purpose, mid-rollout, with real components: the
// real kube-apiserver and etcd, the manager and node agent binaries, sandboxed systemd hosts.
// Each test watches the fleet throughout and checks the rollout's promises: never more hosts
// unavailable than maxUnavailable, no host moved twice, gateways left alone where nothing
// asked for a change, and the rollout complete in the end. The recovery times are logged.
package faults

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/stack"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func TestMain(m *testing.M) { os.Exit(systemdhost.RunWithLeakCheck(m)) }

const profile = "edge"

func up(t *testing.T, o stack.Options) *stack.Stack {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the fault tests boot systemd hosts and need root")
	}
	o.BinDir = t.TempDir()
	if err := stack.Build(o.BinDir); err != nil {
		t.Fatal(err)
	}
	o.Dir = t.TempDir()
	o.Progress = func(m string) { t.Log(m) }
	s, err := stack.Up(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			names := []string{}
			for i := range max(o.ManagerReplicas, 1) {
				names = append(names, stack.ManagerName(i))
			}
			for _, h := range o.Hosts {
				names = append(names, stack.AgentName(h))
			}
			for _, name := range names {
				t.Logf("--- %s log (tail):\n%s", name, tail(s.Log(name), 40))
			}
			out, _ := s.Kubectl("get", "events", "-A", "--sort-by=.metadata.creationTimestamp",
				"-o", "custom-columns=TIME:.metadata.creationTimestamp,OBJECT:.regarding.name,REASON:.reason,NOTE:.note")
			t.Logf("--- events:\n%s", out)
			out, _ = s.Kubectl("get", "gwh,gwi", "-o", "yaml")
			t.Logf("--- hosts and instances:\n%s", out)
		}
		if err := s.Down(); err != nil {
			t.Errorf("stack down: %v", err)
		}
	})
	return s
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func kubectl(t *testing.T, s *stack.Stack, args ...string) string {
	t.Helper()
	out, err := s.Kubectl(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// publish writes a release's tarball into the agents' drop folder and applies its Release;
// it returns the Release's name.
func publish(t *testing.T, s *stack.Stack, o agentruntime.Options) string {
	t.Helper()
	dir, err := os.MkdirTemp(agentruntime.SampleDir, "faults-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	tb := agentruntime.MustBuild(t, o)
	name := "rt-" + strings.ReplaceAll(tb.Label, ".", "-")
	if err := s.Publish(dir, name, tb); err != nil {
		t.Fatal(err)
	}
	return name
}

// applyProfile applies the test profile on a release: one host at a time, each kept
// aligned minReady seconds before the next moves, so that a rollout lasts long enough to be
// interrupted.
func applyProfile(t *testing.T, s *stack.Stack, release string, minReady int) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "profile.yaml")
	if err := os.WriteFile(f, []byte(fmt.Sprintf(`apiVersion: gateway.agent.dev/v1alpha1
kind: GatewayProfile
metadata:
  name: %s
spec:
  release: %s
  nodeSelector: {}
  rollout:
    maxUnavailable: 1
    minReadySeconds: %d
`, profile, release, minReady)), 0o644); err != nil {
		t.Fatal(err)
	}
	kubectl(t, s, "apply", "-f", f)
}

// complete waits until every host runs label, aligned, and the rollout is Complete.
func complete(t *testing.T, s *stack.Stack, label string, timeout time.Duration) {
	t.Helper()
	poll.Until(t, "the rollout to "+label+" complete", timeout, func() (bool, string) {
		var p v1.GatewayProfile
		if err := s.CP.Client.Get(context.Background(), client.ObjectKey{Name: profile}, &p); err != nil {
			return false, err.Error()
		}
		n := int32(len(s.Hosts))
		ok := p.Status.Desired == n && p.Status.Aligned == n && p.Status.Updated == n && p.Status.TargetRelease != nil &&
			p.Status.TargetRelease.Label == label && p.Status.Rollout != nil && p.Status.Rollout.Phase == v1.RolloutComplete &&
			meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReady)
		return ok, fmt.Sprintf("%+v", p.Status)
	})
}

// gateways reads, from each host itself, the main PID of the profile's unit and the version
// its gateway reports on its status socket.
func gateways(t *testing.T, s *stack.Stack) map[string]string {
	t.Helper()
	out := map[string]string{}
	p, err := layout.ForProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	for name, h := range s.Hosts {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		pid, err := h.Dial(t).MainPID(ctx, p.Unit)
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		st, err := agentruntime.GetStatus(ctx, layout.Host{Root: h.Root}.On(p.StatusSocket))
		cancel()
		v := fmt.Sprint(err)
		if err == nil {
			v = st.Version
		}
		out[name] = fmt.Sprintf("pid %d version %s", pid, v)
	}
	return out
}

// movingAt is the first time an instance of the profile asks for label, seen by the fleet
// watch.
func (w *fleetWatch) movedTo(label string) (time.Time, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first time.Time
	n := 0
	for _, moves := range w.moves {
		for _, m := range moves {
			if m.label == label {
				n++
				if first.IsZero() || m.at.Before(first) {
					first = m.at
				}
			}
		}
	}
	return first, n
}

type move struct {
	label, hash string
	at          time.Time
}

// fleetWatch follows the profile's instances with a watch (listing again after the watch
// breaks, as during an API outage) and keeps, event by event, how many hosts are unavailable
// at once and every spec change of every host.
type fleetWatch struct {
	mu        sync.Mutex
	instances map[string]*v1.GatewayInstance
	moves     map[string][]move // host -> spec changes, in order
	peak      int
	peakAt    string
	events    int
}

// unavailable: the host's instance is not proven aligned on its current spec. A host that is
// moving, or failed, counts; the planner counts at least these.
func unavailable(gi *v1.GatewayInstance) bool {
	a := meta.FindStatusCondition(gi.Status.Conditions, v1.ConditionAligned)
	return a == nil || a.Status != metav1.ConditionTrue || gi.Status.ObservedGeneration != gi.Generation ||
		gi.Status.ConfigHash != gi.Spec.ConfigHash
}

func watchFleet(t *testing.T, s *stack.Stack) *fleetWatch {
	t.Helper()
	w := &fleetWatch{instances: map[string]*v1.GatewayInstance{}, moves: map[string][]move{}}
	wc, err := client.NewWithWatch(s.CP.Config, client.Options{Scheme: s.CP.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	sel := client.MatchingLabels{"gateway.agent.dev/profile": profile}
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			var list v1.GatewayInstanceList
			if err := wc.List(ctx, &list, sel); err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			w.mu.Lock()
			w.instances = map[string]*v1.GatewayInstance{}
			for i := range list.Items {
				w.see(&list.Items[i])
			}
			w.mu.Unlock()
			wi, err := wc.Watch(ctx, &v1.GatewayInstanceList{}, sel, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion}})
			if err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			for ev := range wi.ResultChan() {
				gi, ok := ev.Object.(*v1.GatewayInstance)
				if !ok {
					break // an error event: list again
				}
				w.mu.Lock()
				if ev.Type == watch.Deleted {
					delete(w.instances, gi.Spec.Host)
				} else {
					w.see(gi)
				}
				w.mu.Unlock()
			}
			wi.Stop()
		}
	}()
	return w
}

// see records one instance's new state. Called with w.mu held.
func (w *fleetWatch) see(gi *v1.GatewayInstance) {
	w.events++
	host := gi.Spec.Host
	moves := w.moves[host]
	if len(moves) == 0 || moves[len(moves)-1].hash != gi.Spec.ConfigHash {
		w.moves[host] = append(moves, move{label: gi.Spec.Release.Label, hash: gi.Spec.ConfigHash, at: time.Now()})
	}
	w.instances[host] = gi
	n := 0
	var who []string
	for h, i := range w.instances {
		if unavailable(i) {
			n++
			who = append(who, h)
		}
	}
	if n > w.peak {
		sort.Strings(who)
		w.peak, w.peakAt = n, fmt.Sprintf("%v at %s", who, time.Now().Format(time.RFC3339Nano))
	}
}

// check fails the test if more than maxUnavailable hosts were unavailable at once, or if a
// host was pointed twice at the same spec (moved away and back, or moved twice).
func (w *fleetWatch) check(t *testing.T, maxUnavailable int) {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	t.Logf("fleet watch: %d instance states seen, at most %d host(s) unavailable at once", w.events, w.peak)
	if w.peak > maxUnavailable {
		t.Errorf("%d hosts unavailable at once (maxUnavailable %d): %s", w.peak, maxUnavailable, w.peakAt)
	}
	for host, moves := range w.moves {
		seen := map[string]bool{}
		var labels []string
		for _, m := range moves {
			labels = append(labels, m.label)
			if seen[m.hash] {
				t.Errorf("%s was moved twice to the same spec: %v", host, labels)
			}
			seen[m.hash] = true
		}
	}
}

// firstMove waits until the first host is pointed at label and returns when that was seen.
func firstMove(t *testing.T, w *fleetWatch, label string) time.Time {
	t.Helper()
	var at time.Time
	poll.Until(t, "the first host moved to "+label, 2*time.Minute, func() (bool, string) {
		var n int
		at, n = w.movedTo(label)
		return n > 0, "not yet"
	})
	return at
}

// heartbeatsAfter waits until every host's agent has renewed its Lease after since and
// returns how long after since the last of them landed.
func heartbeatsAfter(t *testing.T, s *stack.Stack, since time.Time) time.Duration {
	t.Helper()
	var last time.Duration
	for name := range s.Hosts {
		poll.Until(t, name+"'s agent heart-beating again", 2*time.Minute, func() (bool, string) {
			var l coordinationv1.Lease
			if err := s.CP.Client.Get(context.Background(), client.ObjectKey{Namespace: v1.DefaultHostLeaseNamespace, Name: name}, &l); err != nil {
				return false, err.Error()
			}
			hb := l.Spec.RenewTime
			return hb != nil && hb.After(since), fmt.Sprint(hb)
		})
		last = max(last, time.Since(since))
	}
	return last
}

// firstMoved returns the host first pointed at label.
func (w *fleetWatch) firstMoved(label string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var first time.Time
	host := ""
	for h, moves := range w.moves {
		for _, m := range moves {
			if m.label == label && (host == "" || m.at.Before(first)) {
				host, first = h, m.at
			}
		}
	}
	return host
}

// movesTo lists the moves to label in time order, for the log.
func (w *fleetWatch) movesTo(label string) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	type hm struct {
		host string
		at   time.Time
	}
	var all []hm
	for h, moves := range w.moves {
		for _, m := range moves {
			if m.label == label {
				all = append(all, hm{h, m.at})
			}
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].at.Before(all[j].at) })
	out := make([]string, len(all))
	for i, m := range all {
		out[i] = m.host + " at " + m.at.Format("15:04:05.000")
	}
	return out
}
