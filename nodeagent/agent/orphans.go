package agent

import (
	"context"
	"os"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/event"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// An instance can go without its host's agent: when its GatewayHost is deleted the controller
// releases it, as Kubernetes deletes the pods of a deleted node. If the machine comes back (or
// the agent was running all along), its units are orphans that nothing asks for. The agent
// removes them: when an instance of this host turns out gone, and at start for every profile
// found on the host. Both go through the instance's own work-queue key, so a removal never
// runs beside an apply of the same profile.

// removeOrphan removes the units of the profile an absent instance named, if this host has them.
func (r *InstanceReconciler) removeOrphan(ctx context.Context, name string) (ctrl.Result, error) {
	profile, ok := strings.CutSuffix(name, "."+r.Host)
	if !ok {
		return ctrl.Result{}, nil
	}
	p, err := layout.ForProfile(profile)
	if err != nil || !r.installed(p) {
		return ctrl.Result{}, nil //nolint:nilerr // not a profile name: nothing of it can be on the host
	}
	ctrl.LoggerFrom(ctx).Info("removing a profile no instance asks for", "profile", profile)
	r.stopToolRuns(profile)
	r.forgetDrift(profile)
	// The home stays: whether the profile asked to purge it went with the instance.
	if err := r.Applier.Remove(ctx, profile, false); err != nil {
		return ctrl.Result{}, err
	}
	r.Recorder.Eventf(&v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: r.Host}}, nil, corev1.EventTypeNormal, "OrphanRemoved", "Remove",
		"no GatewayInstance asks for profile %s on this host any more: stopped and removed agent-gateway@%s.service (its home is kept)", profile, profile)
	return ctrl.Result{}, nil
}

// installed says whether anything of a profile's unit is on the host: its release link or its
// drop-ins. Both live in root-owned directories.
func (r *InstanceReconciler) installed(p layout.Profile) bool {
	for _, f := range []string{p.Current, p.DropInDir} {
		if _, err := os.Lstat(r.Applier.Host.On(f)); err == nil {
			return true
		}
	}
	return false
}

// profilesOnHost sends one event per profile directory on the host, so that each is reconciled
// once at start: applied when its instance exists, removed when it does not.
func (r *InstanceReconciler) profilesOnHost(ch chan<- event.TypedGenericEvent[*v1.GatewayInstance]) func(context.Context) error {
	return func(ctx context.Context) error {
		entries, err := os.ReadDir(r.Applier.Host.On(layout.GatewaysDir))
		if err != nil && !os.IsNotExist(err) {
			return err
		}
		for _, e := range entries {
			if _, err := layout.ForProfile(e.Name()); err != nil || !e.IsDir() {
				continue
			}
			gi := &v1.GatewayInstance{ObjectMeta: metav1.ObjectMeta{Name: v1.InstanceName(e.Name(), r.Host)}}
			select {
			case ch <- event.TypedGenericEvent[*v1.GatewayInstance]{Object: gi}:
			case <-ctx.Done():
				return nil
			}
		}
		return nil
	}
}
