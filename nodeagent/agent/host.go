package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/equality"
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

// DefaultStatusRefresh is how long a GatewayHost's status goes unwritten while nothing in it
// changes, when its agent heart-beats in a Lease.
const DefaultStatusRefresh = 5 * time.Minute

// Heartbeat registers the host's GatewayHost and keeps its heartbeat fresh: it renews the
// host's Lease every Interval, as a kubelet renews its node's Lease, and writes the
// GatewayHost's status only when something in it changes (or every StatusRefresh). The
// manager watches every host's Lease in protobuf, a few hundred bytes each, instead of a
// status write of the whole GatewayHost in JSON every Interval. It runs as a manager Runnable
// until the manager stops.
type Heartbeat struct {
	Client client.Client
	// APIReader reads past the cache. After the API server was away the cache can lag for
	// long (its watch backs off), and a beat written on its stale copy conflicts: the next
	// try reads the live object. The Lease is only ever read through it (the agent does not
	// watch Leases). The cached client is used when nil.
	APIReader client.Reader
	Host      string
	// Labels are the facts the agent reports as labels, all under v1.LabelReportedPrefix; set
	// at registration and kept current. Every other label is an administrator's.
	Labels   map[string]string
	Version  string
	Systemd  *systemd.Conn
	Interval time.Duration
	// LeaseNamespace holds the host's Lease, named after the host. Empty: the agent beats by
	// writing the GatewayHost's status.lastHeartbeatTime every Interval instead.
	LeaseNamespace string
	// StatusRefresh bounds how long the status goes unwritten while nothing in it changes
	// (its lastHeartbeatTime says when it was last written); DefaultStatusRefresh when 0.
	StatusRefresh time.Duration
	// Capabilities are reported on every heartbeat (see HostCapabilities); SetCapabilities
	// changes them once the heartbeat runs.
	Capabilities v1.HostCapabilities
	// Space measures what the releases' filesystem keeps for the agent alone; it sets the
	// StagingSpace condition when not nil.
	Space func() (apply.StagingSpace, error)
	// ID names this agent process in status.agentID and as the Lease's holderIdentity; random
	// when empty.
	ID string

	lease *coordinationv1.Lease // the Lease as last written or read; nil: read it again

	mu        sync.Mutex
	lastWrite time.Time // when this agent last wrote the heartbeat (Lease or status)
	foreignAt time.Time // when another agent's heartbeat was last seen
	foreignID string
}

// SetCapabilities replaces the capabilities the next heartbeats report.
func (h *Heartbeat) SetCapabilities(c v1.HostCapabilities) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.Capabilities = c
}

// Duplicate is true while another agent heart-beats this host too (seen within the last three
// intervals): one host identity in use on two machines. The agent applies nothing meanwhile, so
// the two do not fight over the host's instances.
func (h *Heartbeat) Duplicate() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.duplicateLocked()
}

func (h *Heartbeat) duplicateLocked() bool {
	return !h.foreignAt.IsZero() && time.Since(h.foreignAt) < 3*h.Interval
}

// sawHeartbeat records another agent's heartbeat when the stored one (by holder, at, stored to
// precision) is not this agent's and was written after this agent's last write (the first beat
// cannot tell a twin from a predecessor that stopped, so it counts nothing).
func (h *Heartbeat) sawHeartbeat(holder string, at time.Time, precision time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if holder == "" || holder == h.ID || h.lastWrite.IsZero() || at.Before(h.lastWrite.Truncate(precision)) {
		return
	}
	h.foreignAt, h.foreignID = time.Now(), holder
}

// wrote records this agent's own heartbeat at t.
func (h *Heartbeat) wrote(t time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if t.After(h.lastWrite) {
		h.lastWrite = t
	}
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

// beat renews the Lease, then registers the host if needed and writes its status if due. A
// write that raced with another (the manager owns the Reachable condition) is retried on a
// fresh copy.
func (h *Heartbeat) beat(ctx context.Context) error {
	var errs []error
	renewed := true
	if h.LeaseNamespace != "" {
		err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
			err := h.renew(ctx)
			if err != nil {
				h.lease = nil
			}
			return err
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("renew Lease %s/%s: %w", h.LeaseNamespace, h.Host, err))
			renewed = false
		}
	}
	var reader client.Reader = h.Client
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		// A Lease that cannot be renewed (no RBAC for it yet, a wrong namespace) leaves the
		// heartbeat to the status, written on every beat then, which keeps the host reachable.
		err := h.report(ctx, reader, !renewed)
		if apierrors.IsConflict(err) && h.APIReader != nil {
			reader = h.APIReader
		}
		return err
	})
	return errors.Join(append(errs, err)...)
}

// renew renews the host's Lease from the copy last written, reading it first when unknown
// (the first beat, or after a conflict: another writer, perhaps a twin, came in between).
func (h *Heartbeat) renew(ctx context.Context) error {
	now := metav1.NewMicroTime(time.Now())
	// Informational for other readers (the manager uses its own grace period): four intervals.
	secs := int32(min(max(4*h.Interval, time.Second), time.Duration(math.MaxInt32)*time.Second) / time.Second) //nolint:gosec // bounded just above
	if h.lease == nil {
		var reader client.Reader = h.Client
		if h.APIReader != nil {
			reader = h.APIReader
		}
		var l coordinationv1.Lease
		err := reader.Get(ctx, client.ObjectKey{Namespace: h.LeaseNamespace, Name: h.Host}, &l)
		if apierrors.IsNotFound(err) {
			l = coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: h.LeaseNamespace, Name: h.Host},
				Spec: coordinationv1.LeaseSpec{HolderIdentity: &h.ID, LeaseDurationSeconds: &secs, AcquireTime: &now, RenewTime: &now}}
			if err := h.Client.Create(ctx, &l); err != nil {
				return err
			}
			h.lease = &l
			h.wrote(now.Time)
			return nil
		} else if err != nil {
			return err
		}
		if l.Spec.HolderIdentity != nil && l.Spec.RenewTime != nil {
			h.sawHeartbeat(*l.Spec.HolderIdentity, l.Spec.RenewTime.Time, time.Microsecond)
		}
		h.lease = &l
	}
	l := h.lease.DeepCopy()
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != h.ID {
		l.Spec.HolderIdentity, l.Spec.AcquireTime = &h.ID, &now
		l.Spec.LeaseTransitions = ptrTo(ptrValue(l.Spec.LeaseTransitions) + 1)
	}
	l.Spec.RenewTime, l.Spec.LeaseDurationSeconds = &now, &secs
	if err := h.Client.Update(ctx, l); err != nil {
		return err
	}
	h.lease = l
	h.wrote(now.Time)
	return nil
}

func ptrTo[T any](v T) *T { return &v }

func ptrValue[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// report registers the host if needed, keeps its reported labels current and writes its
// status when something in it changed, when it was last written StatusRefresh ago, or on
// every beat when the agent has no Lease (or force).
func (h *Heartbeat) report(ctx context.Context, reader client.Reader, force bool) error {
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
	if hb := gh.Status.LastHeartbeatTime; hb != nil && h.LeaseNamespace == "" {
		// With a Lease, its holder tells a twin: the status is written too rarely for it.
		h.sawHeartbeat(gh.Status.AgentID, hb.Time, time.Second)
	}
	if stale := h.staleLabels(&gh); len(stale) > 0 {
		// Facts change rarely (KVM after a reboot, a Kata install): only then the labels are
		// written, and only the reported ones.
		patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": stale}}) // strings only
		if err := h.Client.Patch(ctx, &gh, client.RawPatch(types.MergePatchType, patch)); err != nil {
			return err
		}
	}
	base := gh.DeepCopy()
	gh.Status.AgentID = h.ID
	gh.Status.AgentVersion = h.Version
	gh.Status.ObservedGeneration = gh.Generation
	h.mu.Lock()
	gh.Status.Capabilities = h.Capabilities
	h.mu.Unlock()
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
	refresh := h.StatusRefresh
	if refresh <= 0 {
		refresh = DefaultStatusRefresh
	}
	last := gh.Status.LastHeartbeatTime
	if h.LeaseNamespace != "" && !force && last != nil && time.Since(last.Time) < refresh && equality.Semantic.DeepEqual(base.Status, gh.Status) {
		return nil
	}
	now := metav1.Now()
	gh.Status.LastHeartbeatTime = &now
	// Optimistic lock: the controller manager writes the Reachable condition of this status.
	if err := h.Client.Status().Patch(ctx, &gh, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); err != nil {
		return err
	}
	if h.LeaseNamespace == "" {
		h.wrote(now.Time)
	}
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
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, "SeparateFilesystem", s.Reserve()
	case s.OK(apply.DefaultMinStagingReserve):
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, "RootReserve", s.Reserve()
	default:
		c.Status, c.Reason, c.Message = metav1.ConditionFalse, "NoRootReserve", s.Reserve()
	}
	return c
}
