// Command manager runs the gateway-operator controller manager: it plans which release runs on
// which host and sums up what the hosts' agents report.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	gatewayv1alpha1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
)

func main() {
	var metricsAddr, probeAddr, leaderNS string
	var leaderElect, pprofOn bool
	var o controllers.Options
	flag.StringVar(&metricsAddr, "metrics-bind-address", ":8080", "metrics listen address; 0 turns metrics off")
	flag.StringVar(&probeAddr, "health-probe-bind-address", ":8081", "health probe listen address; 0 turns probes off")
	flag.BoolVar(&leaderElect, "leader-elect", false, "elect a leader, so that only one of several replicas acts")
	flag.BoolVar(&pprofOn, "pprof", false, "serve Go profiles at /debug/pprof/ on the metrics address")
	flag.StringVar(&leaderNS, "leader-election-namespace", "", "namespace of the leader election lease (default: the pod's namespace)")
	flag.DurationVar(&o.HostGracePeriod, "host-grace-period", 40*time.Second, "heartbeat age after which a host counts as unreachable")
	flag.StringVar(&o.HostLeaseNamespace, "host-lease-namespace", gatewayv1alpha1.DefaultHostLeaseNamespace, "namespace of the hosts' heartbeat Leases (the agents' --lease-namespace)")
	flag.StringVar(&o.ToolRunRuntimeClass, "toolrun-runtime-class", "kata", "the Kata RuntimeClass every ToolRun pod runs with (never a fallback to runc)")
	flag.DurationVar(&o.ToolRunTTL, "toolrun-ttl", time.Hour, "how long a finished ToolRun is kept")
	flag.StringVar(&o.MaterialNamespace, "material-namespace", controllers.DefaultMaterialNamespace,
		"the namespace of the Secrets and ConfigMaps profiles name, and of each host's Role to read them")
	zopts := zap.Options{}
	zopts.BindFlags(flag.CommandLine)
	flag.Parse()
	log := zap.New(zap.UseFlagOptions(&zopts))
	ctrl.SetLogger(log)

	cfg, err := ctrl.GetConfig()
	if err != nil {
		fail(err)
	}
	// The watches carry every host's heartbeat renewals: gzip on them costs the manager and the
	// API server more CPU than it saves on a cluster's network.
	cfg.DisableCompression = true
	toolRunPods, err := labels.Parse(controllers.LabelToolRun)
	if err != nil {
		fail(err)
	}
	scheme := runtime.NewScheme()
	if err := errors.Join(clientgoscheme.AddToScheme(scheme), gatewayv1alpha1.AddToScheme(scheme)); err != nil {
		fail(err)
	}
	metrics := metricsserver.Options{BindAddress: metricsAddr}
	if pprofOn {
		metrics.ExtraHandlers = map[string]http.Handler{
			"/debug/pprof/":        http.HandlerFunc(pprof.Index),
			"/debug/pprof/profile": http.HandlerFunc(pprof.Profile),
			"/debug/pprof/heap":    pprof.Handler("heap"),
		}
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: scheme,
		// The manager reads only tool-run Pods: never cache every Pod of the cluster.
		// Nothing here reads managedFields: dropping them from the cache halves what a large
		// fleet's hosts and instances take in memory, and what each copy of them costs; the
		// strings they repeat are shared (see CacheTransform).
		// Secrets, ConfigMaps, Roles and RoleBindings: those of the material namespace only.
		Cache: cache.Options{ByObject: byObject(toolRunPods, o.MaterialNamespace),
			DefaultTransform: controllers.CacheTransform()},
		Metrics:                 metrics,
		HealthProbeBindAddress:  probeAddr,
		LeaderElection:          leaderElect,
		LeaderElectionID:        "gateway-operator.gateway.agent.dev",
		LeaderElectionNamespace: leaderNS,
		// A new leader does not wait for the old lease to expire when the old one stops cleanly.
		LeaderElectionReleaseOnCancel: true,
	})
	if err != nil {
		fail(err)
	}
	if err := controllers.Setup(mgr, o); err != nil {
		fail(err)
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		fail(err)
	}
	if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
		fail(err)
	}
	log.Info("starting controller manager", "hostGracePeriod", o.HostGracePeriod, "leaderElect", leaderElect)
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		fail(err)
	}
}

func byObject(toolRunPods labels.Selector, materialNS string) map[client.Object]cache.ByObject {
	m := controllers.MaterialCache(materialNS)
	m[&corev1.Pod{}] = cache.ByObject{Label: toolRunPods}
	return m
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "manager:", err)
	os.Exit(1)
}
