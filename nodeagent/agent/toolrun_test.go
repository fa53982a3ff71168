package agent_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
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
		if reply.ConnectError != "" || reply.Phase != microvm.Failed || reply.ExitCode != 5 || string(reply.Stdout) != "untrusted code ran as 1000\n" {
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
