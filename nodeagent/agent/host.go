package agent

import (
	"context"
	"os"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	Labels    map[string]string
	Version   string
	Systemd   *systemd.Conn
	Interval  time.Duration
	// Capabilities are reported on every heartbeat (see HostCapabilities).
	Capabilities v1.HostCapabilities
	// Space measures what the releases' filesystem keeps for the agent alone; it sets the
	// StagingSpace condition when not nil.
	Space func() (apply.StagingSpace, error)
}

// Start registers the host, then beats every Interval.
func (h *Heartbeat) Start(ctx context.Context) error {
	log := ctrl.LoggerFrom(ctx).WithValues("host", h.Host)
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
	base := gh.DeepCopy()
	now := metav1.Now()
	gh.Status.LastHeartbeatTime = &now
	gh.Status.AgentVersion = h.Version
	gh.Status.ObservedGeneration = gh.Generation
	gh.Status.Capabilities = h.Capabilities
	ready := metav1.Condition{Type: v1.ConditionReady, Status: metav1.ConditionTrue, Reason: "AgentRunning",
		Message: "the agent runs and reaches systemd", ObservedGeneration: gh.Generation}
	if v, err := h.Systemd.Version(); err == nil {
		gh.Status.SystemdVersion = v
	} else {
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "SystemdUnreachable", err.Error()
	}
	meta.SetStatusCondition(&gh.Status.Conditions, ready)
	if h.Space != nil {
		meta.SetStatusCondition(&gh.Status.Conditions, stagingCondition(h.Space, gh.Generation))
	}
	// Optimistic lock: the controller manager writes the Reachable condition of this status.
	return h.Client.Status().Patch(ctx, &gh, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{}))
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
