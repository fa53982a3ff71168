package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
)

// kataShims are where a Kata Containers installation puts its containerd shim.
var kataShims = []string{"/usr/bin/containerd-shim-kata-v2", "/usr/local/bin/containerd-shim-kata-v2", "/opt/kata/bin/containerd-shim-kata-v2"}

// probeCapabilities finds what the host offers: KVM when the agent can open /dev/kvm for
// reading and writing, Kata when a Kata shim is installed on the host, MicroVM when this agent
// serves host-local tool runs.
func probeCapabilities(host layout.Host, microVM bool) v1.HostCapabilities {
	c := v1.HostCapabilities{MicroVM: microVM}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		c.KVM = true
		_ = f.Close()
	}
	for _, shim := range kataShims {
		if fi, err := os.Stat(host.On(shim)); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			c.Kata = true
			break
		}
	}
	return c
}

// Heartbeat registers the host's GatewayHost and keeps its heartbeat fresh. It runs as a
// manager Runnable until the manager stops.
type Heartbeat struct {
	Client client.Client
	// APIReader reads past the cache. After the API server was away the cache can lag for
	// long (its watch backs off), and a beat written on its stale copy conflicts: the next
	// try reads the live object. The cached client is used when nil.
	APIReader client.Reader
	Host      string
	// Labels are the facts the agent reports as labels, all under v1.LabelReportedPrefix; set
	// at registration and kept current. Every other label is an administrator's.
	Labels   map[string]string
	Version  string
	Systemd  *systemd.Conn
	Interval time.Duration
	// Capabilities are reported on every heartbeat (see HostCapabilities).
	Capabilities v1.HostCapabilities
	// Space measures what the releases' filesystem keeps for the agent alone; it sets the
	// StagingSpace condition when not nil.
	Space func() (apply.StagingSpace, error)
	// ID names this agent process in status.agentID; random when empty.
	ID string

	mu        sync.Mutex
	lastWrite time.Time // when this agent last wrote the heartbeat
	foreignAt time.Time // when another agent's heartbeat was last seen
	foreignID string
}

// Duplicate is true while another agent heart-beats this host's GatewayHost too (seen within
// the last three intervals): one host identity in use on two machines. The agent applies
// nothing meanwhile, so the two do not fight over the host's instances.
func (h *Heartbeat) Duplicate() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.duplicateLocked()
}

func (h *Heartbeat) duplicateLocked() bool {
	return !h.foreignAt.IsZero() && time.Since(h.foreignAt) < 3*h.Interval
}

// sawForeign records another agent's heartbeat when the stored one is not this agent's and was
// written after this agent's last write (the first beat cannot tell a twin from a predecessor
// that stopped, so it counts nothing).
func (h *Heartbeat) sawForeign(gh *v1.GatewayHost) {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := gh.Status
	if st.AgentID == "" || st.AgentID == h.ID || h.lastWrite.IsZero() || st.LastHeartbeatTime == nil ||
		st.LastHeartbeatTime.Time.Before(h.lastWrite.Truncate(time.Second)) {
		return
	}
	h.foreignAt, h.foreignID = time.Now(), st.AgentID
}

// Start registers the host, then beats every Interval.
func (h *Heartbeat) Start(ctx context.Context) error {
	log := ctrl.LoggerFrom(ctx).WithValues("host", h.Host)
	if h.ID == "" {
		h.ID = rand.Text()[:16]
	}
	// A failed beat is tried again soon (1 s, doubling up to Interval): until the first one
	// lands the host counts as unreachable, and the rollout planner treats it so.
	var wait, backoff time.Duration
	for {
		if err := h.beat(ctx); err != nil {
			log.Error(err, "heartbeat")
			backoff = min(max(2*backoff, time.Second), h.Interval)
			wait = backoff
		} else {
			wait, backoff = h.Interval, 0
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// beat registers the host if needed and writes one heartbeat. A write that raced with the
// controller manager's (which owns the Reachable condition) is retried on the fresh copy.
func (h *Heartbeat) beat(ctx context.Context) error {
	var reader client.Reader = h.Client
	return retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		err := h.beatOnce(ctx, reader)
		if apierrors.IsConflict(err) && h.APIReader != nil {
			reader = h.APIReader
		}
		return err
	})
}

func (h *Heartbeat) beatOnce(ctx context.Context, reader client.Reader) error {
	var gh v1.GatewayHost
	err := reader.Get(ctx, client.ObjectKey{Name: h.Host}, &gh)
	if apierrors.IsNotFound(err) {
		gh = v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: h.Host, Labels: h.Labels}}
		// Create fills gh with what the API server stored; a Get right after it would read a
		// cache that may not have seen the object yet. AlreadyExists (registered by someone
		// else meanwhile) is tried again after a second, when the cache has it.
		if err := h.Client.Create(ctx, &gh); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	h.sawForeign(&gh)
	if stale := h.staleLabels(&gh); len(stale) > 0 {
		// Facts change rarely (KVM after a reboot, a Kata install): only then the labels are
		// written, and only the reported ones.
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": stale}}) // strings only
		if err := h.Client.Patch(ctx, &gh, client.RawPatch(types.MergePatchType, patch)); err != nil {
			return err
		}
	}
	base := gh.DeepCopy()
	now := metav1.Now()
	gh.Status.AgentID = h.ID
	gh.Status.LastHeartbeatTime = &now
	gh.Status.AgentVersion = h.Version
	gh.Status.ObservedGeneration = gh.Generation
	gh.Status.Capabilities = h.Capabilities
	if v, err := h.Systemd.Version(); err == nil {
		gh.Status.SystemdVersion = v
		v1.SetCondition(&gh, v1.ConditionReady, metav1.ConditionTrue, "AgentRunning", "the agent runs and reaches systemd")
	} else {
		v1.SetCondition(&gh, v1.ConditionReady, metav1.ConditionFalse, "SystemdUnreachable", err.Error())
	}
	if h.Space != nil {
		meta.SetStatusCondition(&gh.Status.Conditions, stagingCondition(h.Space, gh.Generation))
	}
	h.mu.Lock()
	if h.duplicateLocked() {
		v1.SetCondition(&gh, v1.ConditionDuplicateAgent, metav1.ConditionTrue, "AnotherAgent", fmt.Sprintf(
			"agents %s and %s both heart-beat this host: one host identity is in use on two machines (a cloned image?); "+
				"both apply nothing until one stops or gets its own identity", h.ID, h.foreignID))
	} else {
		v1.SetCondition(&gh, v1.ConditionDuplicateAgent, metav1.ConditionFalse, "OneAgent", "agent "+h.ID+" alone heart-beats this host")
	}
	h.mu.Unlock()
	// Optimistic lock: the controller manager writes the Reachable condition of this status.
	if err := h.Client.Status().Patch(ctx, &gh, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
		return err
	}
	h.mu.Lock()
	h.lastWrite = now.Time
	h.mu.Unlock()
	return nil
}

// staleLabels are the reported labels whose value on the host differs from this agent's.
func (h *Heartbeat) staleLabels(gh *v1.GatewayHost) map[string]string {
	stale := map[string]string{}
	for k, v := range h.Labels {
		if gh.Labels[k] != v {
			stale[k] = v
		}
	}
	return stale
}

// ReportedLabels are the labels an agent sets on its GatewayHost: facts about the host, under
// v1.LabelReportedPrefix, plus any extra the operator of the agent adds (which must use that
// prefix too).
func ReportedLabels(c v1.HostCapabilities, extra map[string]string) (map[string]string, error) {
	l := map[string]string{
		v1.LabelReportedArch: runtime.GOARCH,
		v1.LabelReportedKVM:  strconv.FormatBool(c.KVM),
		v1.LabelReportedKata: strconv.FormatBool(c.Kata),
	}
	for k, v := range extra {
		if !strings.HasPrefix(k, v1.LabelReportedPrefix) {
			return nil, fmt.Errorf("label %s: an agent may set only labels under %s; the labels profiles select on are an administrator's (kubectl label gatewayhost <host> %s=%s)",
				k, v1.LabelReportedPrefix, k, v)
		}
		l[k] = v
	}
	return l, nil
}

// ConditionStagingSpace says whether a gateway that fills its home can keep the agent from
// staging a release: True when the releases' filesystem keeps enough space for root alone (or
// homes live elsewhere).
const ConditionStagingSpace = "StagingSpace"

func stagingCondition(space func() (apply.StagingSpace, error), gen int64) metav1.Condition {
	c := metav1.Condition{Type: ConditionStagingSpace, ObservedGeneration: gen}
	s, err := space()
	switch {
	case err != nil:
		c.Status, c.Reason, c.Message = metav1.ConditionUnknown, "NotMeasured", err.Error()
	case !s.Shared:
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, "SeparateFilesystem", s.String()
	case s.OK(apply.DefaultMinStagingReserve):
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, "RootReserve", s.String()
	default:
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, "NoRootReserve", s.String()
	}
	return c
}
