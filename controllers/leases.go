package controllers

import (
	"context"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// leaseView keeps each host's last Lease renewal, from a list of the hosts' Leases taken every
// period. Every agent renews its Lease every few seconds; the manager needs to know only, when a
// host's grace period would end, whether a renewal came meanwhile. A watch would hand it every
// renewal of every host as an event to receive, decode and queue (at 1,000 hosts, 100 a
// second); one list in protobuf every period costs a small fraction of that. A host is judged
// unreachable only from a list taken after its heartbeat went stale, so the period delays that
// verdict by at most one period and never makes it early. The list also tells which reachable
// hosts went stale: a host with a Lease needs no check queued per grace period.
type leaseView struct {
	reader    client.Reader // past the cache: Leases are not watched
	hosts     client.Reader // the cached GatewayHosts
	namespace string
	period    time.Duration
	grace     time.Duration

	mu    sync.RWMutex
	renew map[string]time.Time // host name → its Lease's renewTime
	at    time.Time            // when the last list was asked for; zero before the first
}

// renewed returns a host's last renewal seen, when the Leases were last listed (zero before the
// first list), and whether the host has a Lease.
func (v *leaseView) renewed(host string) (time.Time, time.Time, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	t, ok := v.renew[host]
	return t, v.at, ok
}

// start lists the Leases every period until ctx ends, waking the hosts whose reachability a
// list can change. It is the host controller's source: it runs only while this manager leads.
func (v *leaseView) start(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
	log := ctrl.LoggerFrom(ctx).WithName("host-leases")
	go func() {
		t := time.NewTicker(v.period)
		defer t.Stop()
		for {
			if err := v.poll(ctx, q); err != nil && ctx.Err() == nil {
				log.Error(err, "list the hosts' Leases", "namespace", v.namespace)
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// poll lists the Leases once and wakes the hosts it concerns (see update).
func (v *leaseView) poll(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
	at := time.Now()
	var list coordinationv1.LeaseList
	if err := v.reader.List(ctx, &list, client.InNamespace(v.namespace)); err != nil {
		return err
	}
	for _, host := range v.update(ctx, list.Items, at) {
		q.Add(reconcile.Request{NamespacedName: client.ObjectKey{Name: host}})
	}
	return nil
}

// update stores a list of the Leases taken at at and returns the hosts to wake: a renewal of a
// host that is not Reachable now (it may be again), a reachable host whose heartbeat is older
// than the grace period at at (it may be unreachable), a renewTime that moved backwards (a
// clock set back), and a Lease that is gone. A renewal of a reachable host wakes nothing.
func (v *leaseView) update(ctx context.Context, leases []coordinationv1.Lease, at time.Time) []string {
	renew := make(map[string]time.Time, len(leases))
	for i := range leases {
		if rt := leases[i].Spec.RenewTime; rt != nil {
			renew[leases[i].Name] = rt.Time
		}
	}
	v.mu.Lock()
	old := v.renew
	v.renew, v.at = renew, at
	v.mu.Unlock()
	var wake []string
	for host, t := range renew {
		was, seen := old[host]
		if seen && t.Before(was) {
			wake = append(wake, host)
			continue
		}
		var h v1.GatewayHost
		// Read-only: a host not in the cache is not woken; its creation wakes its controller,
		// which reads its Lease then.
		if err := v.hosts.Get(ctx, client.ObjectKey{Name: host}, &h, readOnly); err != nil {
			if !apierrors.IsNotFound(err) {
				wake = append(wake, host)
			}
			continue
		}
		last := t
		if hb := h.Status.LastHeartbeatTime; hb != nil && hb.After(last) {
			last = hb.Time
		}
		renewed := !seen || !t.Equal(was)
		reachable := meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReachable)
		if (!reachable && renewed) || (reachable && at.Sub(last) > v.grace) {
			wake = append(wake, host)
		}
	}
	for host := range old {
		if _, ok := renew[host]; !ok {
			wake = append(wake, host)
		}
	}
	return wake
}

// readOnly reads the cache without copying: for reads that change nothing they read.
var readOnly = &client.GetOptions{UnsafeDisableDeepCopy: func() *bool { t := true; return &t }()}
