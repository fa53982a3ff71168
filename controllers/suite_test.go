package controllers_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/poll"
)

// The controllers run in this test binary against a real kube-apiserver and etcd. No host
// agents run here: tests that need instance status write it as an agent would, and their names
// say "SimulatedAgent".

var (
	cp *controlplane.Env
	c  client.Client
)

const grace = 8 * time.Second

// materialNS holds the Secrets and ConfigMaps the tests' profiles name.
const materialNS = "gateway-material"

// leaseNS holds the hosts' heartbeat Leases, as in a real install.
const leaseNS = v1.DefaultHostLeaseNamespace

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	var err error
	cp, err = controlplane.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = cp.Stop() }()
	c = cp.Client
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: leaseNS}}
	if err := c.Create(context.Background(), ns); err != nil && !apierrors.IsAlreadyExists(err) {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(logSink())))
	if err := c.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: materialNS}}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := startManager(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if err := stopManager(); err != nil {
		fmt.Fprintln(os.Stderr, "manager:", err)
		return 1
	}
	return code
}

// stopManager stops the running controller manager; startManager starts a new one, as a
// restarted controller process would.
var stopManager func() error

func startManager() error {
	mgr, err := ctrl.NewManager(cp.Config, ctrl.Options{
		Scheme:  cp.Scheme,
		Cache:   cache.Options{ByObject: controllers.MaterialCache(materialNS)},
		Metrics: metricsserver.Options{BindAddress: "0"},
		// Every manager of this binary registers the same controller names.
		Controller: config.Controller{SkipNameValidation: ptr(true)},
	})
	if err != nil {
		return err
	}
	if err := controllers.Setup(mgr, controllers.Options{HostGracePeriod: grace, HostLeaseNamespace: leaseNS,
		MaterialNamespace: materialNS}); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	stopManager = func() error { cancel(); return <-done }
	return nil
}

func ptr[T any](v T) *T { return &v }

// logSink shows the manager's logs when GATEWAY_TEST_LOGS is set.
func logSink() io.Writer {
	if os.Getenv("GATEWAY_TEST_LOGS") != "" {
		return os.Stderr
	}
	return io.Discard
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	poll.Until(t, what, 60*time.Second, cond)
}

func mustCreate(t *testing.T, o client.Object) {
	t.Helper()
	if err := c.Create(context.Background(), o); err != nil {
		t.Fatalf("create %s: %v", o.GetName(), err)
	}
}

func host(name string, labels map[string]string) *v1.GatewayHost {
	return &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func rel(name, label, sha string) *v1.Release {
	return &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.ReleaseSpec{
		Source: v1.ReleaseSource{URL: "https://releases.example.com/" + name + ".tar.gz"}, SHA256: sha, Label: label}}
}

func profile(name, release string, selector map[string]string) *v1.GatewayProfile {
	return &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.GatewayProfileSpec{
		Release: release, NodeSelector: metav1.LabelSelector{MatchLabels: selector}}}
}

// simulatedAgentReports writes an instance's status the way a host's agent does after an apply.
func simulatedAgentReports(t *testing.T, name string, aligned bool, reason string) {
	t.Helper()
	ctx := context.Background()
	var gi v1.GatewayInstance
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &gi); err != nil {
		t.Fatal(err)
	}
	base := gi.DeepCopy()
	gen := gi.Generation
	gi.Status.ObservedGeneration = gen
	gi.Status.ConfigHash = gi.Spec.ConfigHash
	gi.Status.LastHandledRetry = v1.RequestToken(gi.Annotations[v1.AnnotationRetry])
	set := func(typ string, s metav1.ConditionStatus, why string) {
		meta.SetStatusCondition(&gi.Status.Conditions, metav1.Condition{Type: typ, Status: s, Reason: why, Message: why, ObservedGeneration: gen})
	}
	if aligned {
		gi.Status.CurrentRelease = &v1.ReleaseSummary{Name: gi.Spec.Release.Name, Label: gi.Spec.Release.Label, SHA256: gi.Spec.Release.SHA256}
		gi.Status.MainPID = 4242
		set(v1.ConditionAligned, metav1.ConditionTrue, "Proven")
		set(v1.ConditionDegraded, metav1.ConditionFalse, "Applied")
	} else {
		set(v1.ConditionAligned, metav1.ConditionFalse, "ProofFailed")
		set(v1.ConditionDegraded, metav1.ConditionTrue, reason)
	}
	if err := c.Status().Patch(ctx, &gi, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
}

// simulatedAgentRemovesUnit drops the finalizer, as an agent does once the unit is gone.
func simulatedAgentRemovesUnit(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	var gi v1.GatewayInstance
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &gi); err != nil {
		t.Fatal(err)
	}
	base := gi.DeepCopy()
	gi.Finalizers = nil
	if err := c.Patch(ctx, &gi, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
}

// renewLease renews a host's heartbeat Lease at renewTime at, creating it if needed, as the
// host's agent does.
func renewLease(ctx context.Context, host string, at time.Time) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var l coordinationv1.Lease
		err := c.Get(ctx, client.ObjectKey{Namespace: leaseNS, Name: host}, &l)
		rt := metav1.NewMicroTime(at)
		if apierrors.IsNotFound(err) {
			id := "sim-" + host
			l = coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: host},
				Spec: coordinationv1.LeaseSpec{HolderIdentity: &id, RenewTime: &rt}}
			return c.Create(ctx, &l)
		} else if err != nil {
			return err
		}
		l.Spec.RenewTime = &rt
		return c.Update(ctx, &l)
	})
}

// simulatedAgentHeartbeats keeps hosts' heartbeats fresh, as their agents would, until the
// test ends or the returned function stops them (the agents stop). It returns once every named
// host that exists is Reachable, as a fleet is before anyone rolls a release over it: a host
// the manager has not heard from yet serves nothing, and a rollout moves it at once.
func simulatedAgentHeartbeats(t *testing.T, names ...string) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	beat := func() {
		for _, n := range names {
			// A failed renewal is tried again at the next tick, as a real agent does.
			_ = renewLease(ctx, n, time.Now())
		}
	}
	beat()
	go func() {
		defer close(done)
		tick := time.NewTicker(grace / 4)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				beat()
			}
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	eventually(t, "the hosts Reachable", func() (bool, string) {
		for _, n := range names {
			var h v1.GatewayHost
			if err := c.Get(context.Background(), client.ObjectKey{Name: n}, &h); apierrors.IsNotFound(err) {
				continue
			} else if err != nil {
				return false, err.Error()
			}
			if !meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReachable) {
				return false, n + " is not Reachable"
			}
		}
		return true, ""
	})
	return stop
}

// nopRecorder drops events, for reconcilers driven by hand.
type nopRecorder struct{}

func (nopRecorder) Eventf(runtime.Object, runtime.Object, string, string, string, string, ...any) {}
func (nopRecorder) AnnotatedEventf(runtime.Object, runtime.Object, map[string]string, string, string, string, string, ...any) {
}

func reqFor(o client.Object) ctrl.Request {
	return ctrl.Request{NamespacedName: client.ObjectKeyFromObject(o)}
}
