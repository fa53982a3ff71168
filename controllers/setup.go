package controllers

import (
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
)

// Options configure the controller manager's reconcilers.
type Options struct {
	// HostGracePeriod is how old a host's heartbeat may be before it counts as unreachable.
	HostGracePeriod time.Duration
	// HostLeaseNamespace holds the hosts' heartbeat Leases; empty: only the GatewayHosts'
	// status.lastHeartbeatTime counts.
	HostLeaseNamespace string
	// ToolRunRuntimeClass is the Kata RuntimeClass of tool-run Pods.
	ToolRunRuntimeClass string
	// ToolRunTTL is how long a finished tool run is kept.
	ToolRunTTL time.Duration
}

// Setup registers every reconciler with the manager.
func Setup(mgr ctrl.Manager, o Options) error {
	if err := indexFields(mgr); err != nil {
		return err
	}
	if err := (&ReleaseReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("release-controller")}).SetupWithManager(mgr); err != nil {
		return err
	}
	if err := (&GatewayHostReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Recorder: mgr.GetEventRecorder("gatewayhost-controller"),
		GracePeriod: o.HostGracePeriod, LeaseNamespace: o.HostLeaseNamespace}).SetupWithManager(mgr); err != nil {
		return err
	}
	if o.ToolRunRuntimeClass == "" {
		o.ToolRunRuntimeClass = "kata"
	}
	if o.ToolRunTTL == 0 {
		o.ToolRunTTL = time.Hour
	}
	if err := (&ToolRunReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder:     mgr.GetEventRecorder("toolrun-controller"),
		RuntimeClass: o.ToolRunRuntimeClass, TTL: o.ToolRunTTL}).SetupWithManager(mgr); err != nil {
		return err
	}
	return (&GatewayProfileReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("gatewayprofile-controller")}).SetupWithManager(mgr)
}
