package controllers

import (
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
)

// SetupProfileWatches registers rec behind the GatewayProfile controller's watches, with the
// cache indexes they read by, so a test can see which requests those watches make.
func SetupProfileWatches(mgr ctrl.Manager, rec reconcile.Reconciler) error {
	if err := indexFields(mgr); err != nil {
		return err
	}
	return (&GatewayProfileReconciler{Client: mgr.GetClient()}).setupWith(mgr, rec)
}
