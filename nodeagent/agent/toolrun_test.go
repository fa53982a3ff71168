package agent_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	nodev1 "k8s.io/api/node/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
)

// TestAgentServesToolRunsToItsGateways runs the whole host-local Tier-2 path: a real gateway,
// hardened and running as its profile's user on a real systemd host, sends untrusted code to
// its own tool-run socket and gets the microVM's result; a sibling gateway cannot reach that
// socket; deleting the instance takes the socket away.
func TestAgentServesToolRunsToItsGateways(t *testing.T) {
	kernel, _ := microvmguest.Files(t)
	ctx := context.Background()
	c := cp.Client
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	u1 := srv.Add("r1.tar.gz", r1.Data)
	h := startAgent(t, "node-vm", func(o *agent.Options) {
		o.MicroVM = agent.MicroVMOptions{Guest: filepath.Dir(kernel), WorkDir: microvmguest.WorkDir, Accel: "tcg", PoolSize: 1}
	})

	core, api := newInstance("core", "node-vm", r1, u1), newInstance("api", "node-vm", r1, u1)
	for _, gi := range []*v1.GatewayInstance{core, api} {
		if err := c.Create(ctx, gi); err != nil {
			t.Fatal(err)
		}
		eventually(t, gi.Spec.Profile+" to be aligned", func() (bool, string) {
			var got v1.GatewayInstance
			if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got); err != nil {
				return false, err.Error()
			}
			a := condition(&got, v1.ConditionAligned)
			return a != nil && a.Status == metav1.ConditionTrue, fmt.Sprintf("%+v", got.Status)
		})
	}
	var gh v1.GatewayHost
	eventually(t, "the host to report the microVM capability", func() (bool, string) {
		if err := c.Get(ctx, client.ObjectKey{Name: "node-vm"}, &gh); err != nil {
			return false, err.Error()
		}
		return gh.Status.Capabilities.MicroVM, fmt.Sprintf("%+v", gh.Status.Capabilities)
	})
	home := func(p string) string { return filepath.Join(h.Root, "opt/agent/gateways", p, "home") }
	sock := filepath.Join(home("core"), "run", microvm.SocketName)
	eventually(t, "core's tool-run socket", func() (bool, string) {
		_, err := os.Lstat(sock)
		return err == nil, fmt.Sprint(err)
	})
	coreUser, err := users.Manager{Root: h.Root}.Lookup("agent-core")
	if err != nil || coreUser == nil {
		t.Fatalf("agent-core: %v %v", coreUser, err)
	}
	fi, _ := os.Lstat(sock)
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != 0o600 || int(st.Uid) != coreUser.UID {
		t.Fatalf("socket mode %v uid %d, want 0600 of agent-core (%d)", fi.Mode(), st.Uid, coreUser.UID)
	}

	// core's gateway escalates a command to a microVM through its own socket; once the pool
	// has booted its VM, the answer comes from a warm one.
	var reply *agentruntime.ToolRunReply
	eventually(t, "a tool run answered by a warm microVM", func() (bool, string) {
		var err error
		reply, err = agentruntime.ToolRun(ctx, filepath.Join(home("core"), "run", "status.sock"), "",
			microvm.Request{Command: []string{"sh", "-c", "echo untrusted code ran as $(id -u); exit 5"}})
		if err != nil {
			t.Fatal(err)
		}
		if reply.ConnectError != "" || reply.Phase != microvm.Failed || reply.ExitCode != 5 || string(reply.Stdout) != "untrusted code ran as 1000\n" ||
			reply.Route != microvm.RouteHost {
			t.Fatalf("core's tool run: %+v", reply)
		}
		return reply.Start == microvm.StartWarm, fmt.Sprintf("%s start: %s", reply.Start, reply.ColdReason)
	})
	// The pool's VMs run as the agent's per-slot users, never as a gateway's.
	for i := range 2 {
		u, err := users.Manager{Root: h.Root}.Lookup(agent.MicroVMUser(agent.DefaultMicroVMUser, i))
		if err != nil || u == nil || u.UID == coreUser.UID {
			t.Fatalf("microVM user %d: %+v %v", i, u, err)
		}
	}

	// api's gateway, hardened as agent-api, cannot reach core's socket.
	reply, err = agentruntime.ToolRun(ctx, filepath.Join(home("api"), "run", "status.sock"),
		"/opt/agent/gateways/core/home/run/"+microvm.SocketName, microvm.Request{Command: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(reply.ConnectError, "Permission denied") {
		t.Fatalf("api on core's socket: %+v, want a refused connection", reply)
	}

	// Deleting core stops serving its socket.
	if err := c.Delete(ctx, core); err != nil {
		t.Fatal(err)
	}
	eventually(t, "core's socket to be removed", func() (bool, string) {
		_, err := os.Lstat(sock)
		return os.IsNotExist(err), fmt.Sprint(err)
	})
}

// TestAgentRoutesToolRunsToTheCluster_FakeKubelet: on a host without microVMs, a real gateway's
// request on its tool-run socket takes the cluster route: the agent creates a ToolRun in its
// slot, the ToolRun controller makes the run's Pod, a kubelet stand-in completes it, and the
// gateway gets the output with route Cluster; the agent deletes the run.
func TestAgentRoutesToolRunsToTheCluster_FakeKubelet(t *testing.T) {
	ctx := context.Background()
	c := cp.Client
	if err := c.Create(ctx, &nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "kata"}, Handler: "kata"}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	again := true
	mgr, err := ctrl.NewManager(cp.Config, ctrl.Options{Scheme: agent.Scheme(), Metrics: metricsserver.Options{BindAddress: "0"},
		Controller: config.Controller{SkipNameValidation: &again}})
	if err != nil {
		t.Fatal(err)
	}
	if err := (&controllers.ToolRunReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(),
		Recorder: mgr.GetEventRecorder("toolrun-test"), RuntimeClass: "kata", TTL: time.Hour}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	mctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("ToolRun controller: %v", err)
		}
	})

	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	u1 := srv.Add("r1.tar.gz", r1.Data)
	h := startAgent(t, "node-cl", func(o *agent.Options) {
		o.ToolRuns = agent.ToolRunOptions{Route: agent.RouteAuto, Namespace: leaseNS}
	})
	gi := newInstance("tools", "node-cl", r1, u1)
	gi.Spec.ToolRuns = &v1.ToolRunSettings{Image: "busybox:1.36", ClusterSlots: 1}
	if err := c.Create(ctx, gi); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Delete(context.Background(), gi)
		eventually(t, "tools.node-cl to go", func() (bool, string) {
			err := c.Get(context.Background(), client.ObjectKeyFromObject(gi), &v1.GatewayInstance{})
			return apierrors.IsNotFound(err), fmt.Sprint(err)
		})
	})
	home := filepath.Join(h.Root, "opt/agent/gateways/tools/home")
	eventually(t, "the tool-run socket of tools", func() (bool, string) {
		_, err := os.Lstat(filepath.Join(home, "run", microvm.SocketName))
		return err == nil, fmt.Sprint(err)
	})

	slot := v1.ToolRunSlot("tools", "node-cl", 0)
	pod := "trun-" + slot
	t.Cleanup(func() {
		for _, o := range []client.Object{
			&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: pod}},
			&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: pod}},
			&v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: leaseNS, Name: slot}},
		} {
			_ = c.Delete(context.Background(), o, client.GracePeriodSeconds(0))
		}
	})
	// The kubelet stand-in completes the run's Pod once the controller has made it.
	kubelet := make(chan error, 1)
	go func() {
		var p corev1.Pod
		for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			err := c.Get(ctx, client.ObjectKey{Namespace: leaseNS, Name: pod}, &p)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				kubelet <- fmt.Errorf("no pod %s: %w", pod, err)
				return
			}
		}
		now := metav1.Now()
		p.Status.StartTime, p.Status.Phase = &now, corev1.PodSucceeded
		p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "tool", Image: p.Spec.Containers[0].Image,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Message: "answer from the cluster\n", Reason: "Completed"}}}}
		kubelet <- c.Status().Update(ctx, &p)
	}()
	reply, err := agentruntime.ToolRun(ctx, filepath.Join(home, "run", "status.sock"), "",
		microvm.Request{Command: []string{"sh", "-c", "echo answer from the cluster"}, TimeoutSeconds: 30})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-kubelet; err != nil {
		t.Fatal(err)
	}
	if reply.ConnectError != "" || reply.Route != microvm.RouteCluster || reply.Phase != microvm.Succeeded || reply.ExitCode != 0 ||
		string(reply.Stdout) != "answer from the cluster\n" {
		t.Fatalf("tools' tool run: %+v (stdout %q)", reply, reply.Stdout)
	}
	t.Logf("cluster route: %d ms from request to result", reply.DurationMillis)
	eventually(t, "the agent to delete its ToolRun", func() (bool, string) {
		err := c.Get(ctx, client.ObjectKey{Namespace: leaseNS, Name: slot}, &v1.ToolRun{})
		return apierrors.IsNotFound(err), fmt.Sprint(err)
	})
}
