package controllers

import (
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
)

// Options configure the controller manager's reconcilers.
type Options struct {
	// HostGracePeriod is how old a host's heartbeat may be before it counts as unreachable.
	HostGracePeriod time.Duration
}

// Setup registers every reconciler with the manager.
func Setup(mgr ctrl.Manager, o Options) error {
	if err := (&ReleaseReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("release-controller")}).SetupWithManager(mgr); err != nil {
		return err
	}
	if err := (&GatewayHostReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("gatewayhost-controller"),
		GracePeriod: o.HostGracePeriod}).SetupWithManager(mgr); err != nil {
		return err
	}
	return (&GatewayProfileReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("gatewayprofile-controller")}).SetupWithManager(mgr)
}
