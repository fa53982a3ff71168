package security_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/go-logr/logr"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/test/poll"
)

// managerSA is the controller manager's service account, bound to config/rbac/role.yaml by
// config/rbac/role_binding.yaml.
const managerSA = "system:serviceaccount:gateway-operator-system:gateway-operator-manager"

// TestGoneHost: once a host's GatewayHost is deleted, no other agent may release its instance
// or take its name; the controller manager, under its own identity and role, releases it.
func TestGoneHost(t *testing.T) {
	ctx := context.Background()
	if err := admin.Create(ctx, named[v1.GatewayHost]("node-g")); err != nil {
		t.Fatal(err)
	}
	if err := admin.Create(ctx, instance("core", "node-g")); err != nil {
		t.Fatal(err)
	}
	if err := admin.Delete(ctx, named[v1.GatewayHost]("node-g")); err != nil {
		t.Fatal(err)
	}
	runSteps(t, []step{
		{"node-a removes the units finalizer from core.node-g", func(t *testing.T, ctx context.Context) error {
			return editInstance(ctx, nodeA, "core.node-g", func(gi *v1.GatewayInstance) {
				gi.Finalizers = without(gi.Finalizers, v1.FinalizerInstanceUnits)
			})
		}, byPolicy("gateway agent for host node-a may not modify GatewayInstance core.node-g: it belongs to host node-g")},
		{"node-a deletes core.node-g", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, named[v1.GatewayInstance]("core.node-g"))
		}, byRBAC("delete", "gatewayinstances")},
		{"node-a registers GatewayHost node-g", func(t *testing.T, ctx context.Context) error {
			h := named[v1.GatewayHost]("node-g")
			deleteLater(t, h)
			return nodeA.Create(ctx, h)
		}, byPolicy("gateway agent for host node-a may not create GatewayHost node-g: it is not this agent's host")},
	})

	runManager(t)
	// A manager whose role lacks a read of a watched kind never syncs its caches, and one
	// refused a write never gets the instance released: either way this times out.
	poll.Until(t, "the manager to release core.node-g", 90*time.Second, func() (bool, string) {
		var gi v1.GatewayInstance
		err := admin.Get(ctx, client.ObjectKey{Name: "core.node-g"}, &gi)
		return apierrors.IsNotFound(err), fmt.Sprintf("%v %v", err, gi.Finalizers)
	})
	poll.Until(t, "a HostGone event about core.node-g", 30*time.Second, func() (bool, string) {
		var evs eventsv1.EventList
		if err := admin.List(ctx, &evs); err != nil {
			return false, err.Error()
		}
		for _, e := range evs.Items {
			if e.Regarding.Name == "core.node-g" && e.Reason == "HostGone" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events, none HostGone about core.node-g", len(evs.Items))
	})
}

// startManager runs the controller manager as the identity of cfg until the returned function
// stops it.
// runManager runs the controller manager as its service account until the test ends.
func runManager(t *testing.T) {
	t.Helper()
	_, cfg, err := newUser(managerSA, "system:serviceaccounts", "system:serviceaccounts:gateway-operator-system")
	if err != nil {
		t.Fatal(err)
	}
	stop, err := startManager(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("controller manager: %v", err)
		}
	})
}

func startManager(cfg *rest.Config) (func() error, error) {
	ctrl.SetLogger(logr.Discard())
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: cp.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache:      cache.Options{ByObject: controllers.MaterialCache(controllers.DefaultMaterialNamespace)},
		Controller: config.Controller{SkipNameValidation: ptrTo(true)}})
	if err != nil {
		return nil, err
	}
	if err := controllers.Setup(mgr, controllers.Options{HostGracePeriod: time.Minute}); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	return func() error { cancel(); return <-done }, nil
}

func ptrTo[T any](v T) *T { return &v }
