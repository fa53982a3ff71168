// Package plugin_test runs the kubectl gateway plugin the way an operator does: the real kubectl
// finds the built kubectl-gateway on PATH and talks to a real kube-apiserver, where the real
// controller manager runs rollouts. The hosts' agents are simulated (they report every instance
// proven, or failed for the releases a test marks bad): their real work is tested in test/e2e.
// Users authenticate with client certificates and hold only the roles of
// config/rbac/user_roles.yaml.
package plugin_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

var (
	cp *controlplane.Env
	c  client.Client
	// kubeconfigs of an administrator, a viewer and an operator.
	admin, viewer, operator string
	// path is PATH with kubectl and kubectl-gateway first.
	path string
	// failing holds the releases the simulated agents fail to prove.
	failing sync.Map
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	bins, cleanup, err := repo.BuildTemp("kubectl-gateway")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cleanup()
	if cp, err = controlplane.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = cp.Stop() }()
	c = cp.Client
	path = filepath.Dir(bins[0]) + string(os.PathListSeparator) + cp.BinDir + string(os.PathListSeparator) + os.Getenv("PATH")
	dir, err := os.MkdirTemp("", "plugin-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := setUp(dir); err != nil {
		fmt.Fprintln(os.Stderr, "set up:", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop, err := startManager(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	agents := make(chan struct{})
	go func() { defer close(agents); simulatedAgents(ctx) }()
	code := m.Run()
	cancel()
	<-agents
	if err := stop(); err != nil {
		fmt.Fprintln(os.Stderr, "manager:", err)
		return 1
	}
	return code
}

// setUp writes the users' kubeconfigs and applies the shipped user roles with kubectl itself.
func setUp(dir string) error {
	var err error
	if admin, err = cp.Kubeconfig(dir, "admin", "system:masters"); err != nil {
		return err
	}
	if viewer, err = cp.Kubeconfig(dir, "vera"); err != nil {
		return err
	}
	if operator, err = cp.Kubeconfig(dir, "otto"); err != nil {
		return err
	}
	roles, err := repo.Path("config/rbac/user_roles.yaml")
	if err != nil {
		return err
	}
	policy, err := repo.Path("config/policies/instance_policy.yaml")
	if err != nil {
		return err
	}
	for _, args := range [][]string{
		{"apply", "-f", roles},
		{"apply", "-f", policy},
		{"create", "clusterrolebinding", "vera-views", "--clusterrole=gateway-operator-viewer", "--user=vera"},
		{"create", "clusterrolebinding", "otto-operates", "--clusterrole=gateway-operator-operator", "--user=otto"},
	} {
		if out, err := kubectl(admin, args...); err != nil {
			return fmt.Errorf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

func startManager(ctx context.Context) (stop func() error, err error) {
	ctrl.SetLogger(zap.New(zap.WriteTo(logSink())))
	skip := true
	mgr, err := ctrl.NewManager(cp.Config, ctrl.Options{
		Scheme:     cp.Scheme,
		Metrics:    metricsserver.Options{BindAddress: "0"},
		Controller: config.Controller{SkipNameValidation: &skip},
	})
	if err != nil {
		return nil, err
	}
	if err := controllers.Setup(mgr, controllers.Options{HostGracePeriod: 30 * time.Second}); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	return func() error { cancel(); return <-done }, nil
}

// logSink shows the manager's logs when GATEWAY_TEST_LOGS is set.
func logSink() io.Writer {
	if os.Getenv("GATEWAY_TEST_LOGS") != "" {
		return os.Stderr
	}
	return io.Discard
}

// simulatedAgents stand in for every host's agent: they keep heartbeats fresh and answer each
// new spec or retry token of an instance, proven, or failed when its release is marked failing.
func simulatedAgents(ctx context.Context) {
	tick := time.NewTicker(300 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var hosts v1.GatewayHostList
		if err := c.List(ctx, &hosts); err == nil {
			for _, h := range hosts.Items {
				if hb := h.Status.LastHeartbeatTime; hb != nil && time.Since(hb.Time) < 3*time.Second {
					continue
				}
				base := h.DeepCopy()
				now := metav1.Now()
				h.Status.LastHeartbeatTime = &now
				h.Status.AgentVersion, h.Status.SystemdVersion = "test", "252"
				_ = c.Status().Patch(ctx, &h, client.MergeFrom(base))
			}
		}
		var list v1.GatewayInstanceList
		if err := c.List(ctx, &list); err != nil {
			continue
		}
		for i := range list.Items {
			gi := &list.Items[i]
			retry := v1.RequestToken(gi.Annotations[v1.AnnotationRetry])
			if gi.DeletionTimestamp != nil {
				base := gi.DeepCopy()
				gi.Finalizers = nil
				_ = c.Patch(ctx, gi, client.MergeFrom(base))
				continue
			}
			restart, restartAsked := v1.Requested(gi, v1.AnnotationRestart, gi.Status.LastHandledRestart)
			if gi.Status.ObservedGeneration == gi.Generation && gi.Status.LastHandledRetry == retry && !restartAsked {
				continue
			}
			if restartAsked {
				gi.Status.LastHandledRestart = restart
				gi.Status.MainPID++
			}
			report(ctx, gi, retry)
		}
	}
}

func report(ctx context.Context, gi *v1.GatewayInstance, retry string) {
	base := gi.DeepCopy()
	base.Status.LastHandledRestart, base.Status.MainPID = "", 0 // always written
	gen := gi.Generation
	st := &gi.Status
	st.ObservedGeneration, st.ConfigHash, st.LastHandledRetry = gen, gi.Spec.ConfigHash, retry
	st.Unit = "agent-gateway@" + gi.Spec.Profile + ".service"
	set := func(typ string, s metav1.ConditionStatus, why string) {
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: typ, Status: s, Reason: why, Message: why, ObservedGeneration: gen})
	}
	if _, bad := failing.Load(gi.Spec.Release.Name); bad {
		set(v1.ConditionAligned, metav1.ConditionFalse, "ProofFailed")
		set(v1.ConditionDegraded, metav1.ConditionTrue, "ProofFailed")
	} else {
		r := gi.Spec.Release
		st.CurrentRelease = &v1.ReleaseSummary{Name: r.Name, Label: r.Label, SHA256: r.SHA256}
		if st.MainPID == 0 {
			st.MainPID = 4242
		}
		now := metav1.Now()
		st.Alignment = &v1.AlignmentProof{ReleaseSHA256: r.SHA256, PythonPath: "/opt/agent/gateways/" + gi.Spec.Profile + "/current",
			UnitClean: true, SiblingsUnchanged: true, CheckedAt: &now}
		set(v1.ConditionAligned, metav1.ConditionTrue, "Proven")
		set(v1.ConditionIsolated, metav1.ConditionTrue, "Proven")
		set(v1.ConditionDegraded, metav1.ConditionFalse, "Applied")
	}
	_ = c.Status().Patch(ctx, gi, client.MergeFrom(base))
}

// kubectl runs the real kubectl with a kubeconfig and returns its stdout and stderr together.
func kubectl(kubeconfig string, args ...string) (string, error) {
	cmd := exec.Command("kubectl", append(args, "--kubeconfig", kubeconfig)...)
	cmd.Env = append(os.Environ(), "PATH="+path, "HOME="+filepath.Dir(kubeconfig))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// gateway runs `kubectl gateway ARGS` and fails the test if it fails.
func gateway(t *testing.T, kubeconfig string, args ...string) string {
	t.Helper()
	out, err := kubectl(kubeconfig, append([]string{"gateway"}, args...)...)
	if err != nil {
		t.Fatalf("kubectl gateway %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	poll.Until(t, what, 60*time.Second, cond)
}

func mustCreate(t *testing.T, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		if err := c.Create(context.Background(), o); err != nil {
			t.Fatalf("create %s: %v", o.GetName(), err)
		}
		t.Cleanup(func() { _ = c.Delete(context.Background(), o) })
	}
}

func host(name, role string) *v1.GatewayHost {
	return &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"role": role}}}
}

func release(name, label string) *v1.Release {
	sum := sha256.Sum256([]byte(name))
	return &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.ReleaseSpec{
		Source: v1.ReleaseSource{URL: "https://releases.example.com/" + name + ".tar.gz"}, SHA256: hex.EncodeToString(sum[:]), Label: label}}
}

func profile(name, rel, role string, rollout v1.RolloutStrategy) *v1.GatewayProfile {
	return &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1.GatewayProfileSpec{
		Release: rel, NodeSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": role}}, Rollout: rollout}}
}

func getProfile(t *testing.T, name string) *v1.GatewayProfile {
	t.Helper()
	var gp v1.GatewayProfile
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &gp); err != nil {
		t.Fatal(err)
	}
	return &gp
}

// ready waits until a profile is Ready on its current generation.
func ready(t *testing.T, name string) {
	t.Helper()
	eventually(t, name+" ready", func() (bool, string) {
		gp := getProfile(t, name)
		cnd := meta.FindStatusCondition(gp.Status.Conditions, v1.ConditionReady)
		if cnd == nil {
			return false, "no Ready condition"
		}
		return cnd.Status == metav1.ConditionTrue && cnd.ObservedGeneration == gp.Generation, cnd.Reason + ": " + cnd.Message
	})
}

func getHost(t *testing.T, name string) *v1.GatewayHost {
	t.Helper()
	var h v1.GatewayHost
	if err := c.Get(context.Background(), client.ObjectKey{Name: name}, &h); err != nil {
		t.Fatal(err)
	}
	return &h
}
