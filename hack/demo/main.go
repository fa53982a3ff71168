// Command demo runs the whole system on this machine, for a person to look at: a local
// kube-apiserver and etcd, the CRDs, RBAC and admission policies, the controller manager, and
// one node agent on a sandboxed systemd host, with config/samples applied.
//
//	demo up      start it in the background (or show it, if it runs) and wait until aligned
//	demo down    stop it and remove everything it made
//
// The Makefile's demo and demo-down targets call it.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/stack"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

const hostName = "demo-host"

// microVMDir holds the demo agent's per-run microVM folders, a path on the demo host: short
// (QEMU's unix sockets live there) and on the host's own root folder, which the agent reaches
// under its --root (the host's /run is a tmpfs only the host sees). It goes with the state
// folder.
const microVMDir = "/var/lib/gateway-demo-vm"

func stateDir() string {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		cache = filepath.Join(os.Getenv("HOME"), ".cache")
	}
	return filepath.Join(cache, "gateway-operator", "demo")
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: demo up|down")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "up":
		err = up()
	case "down":
		err = down()
	case "serve":
		err = serve()
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func file(name string) string { return filepath.Join(stateDir(), name) }

// running returns the PID of a running demo, or 0.
func running() int {
	b, err := os.ReadFile(file("pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid > 0 && syscall.Kill(pid, 0) == nil {
		return pid
	}
	return 0
}

func up() error {
	if os.Geteuid() != 0 {
		return errors.New("the demo boots a sandboxed systemd host and needs root")
	}
	if running() == 0 {
		_ = os.RemoveAll(stateDir())
		if err := os.MkdirAll(stateDir(), 0o755); err != nil {
			return err
		}
		log, err := os.Create(file("demo.log"))
		if err != nil {
			return err
		}
		self, _ := os.Executable()
		cmd := exec.Command(self, "serve")
		cmd.Stdout, cmd.Stderr = log, log
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // outlives this command
		if err := cmd.Start(); err != nil {
			return err
		}
		log.Close()
		if err := os.WriteFile(file("pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
			return err
		}
		fmt.Println("demo: starting in the background (log: " + file("demo.log") + ")")
	} else {
		fmt.Println("demo: already running")
	}
	// Follow the log until the demo says it is ready or failed.
	seen := 0
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(file("demo.log"))
		if len(b) > seen {
			fmt.Print(string(b[seen:]))
			seen = len(b)
		}
		if _, err := os.Stat(file("ready")); err == nil {
			return show()
		}
		if running() == 0 {
			return errors.New("the demo stopped; see the log above")
		}
		time.Sleep(300 * time.Millisecond)
	}
	return errors.New("the demo did not become ready in 10 minutes")
}

func show() error {
	kc := file("admin.kubeconfig")
	kubectl, _ := os.ReadFile(file("kubectl"))
	get := exec.Command(strings.TrimSpace(string(kubectl)), "--kubeconfig="+kc, "get", "gwh,grel,gwp,gwi")
	get.Stdout, get.Stderr = os.Stdout, os.Stderr
	fmt.Println()
	_ = get.Run()
	proof, _ := os.ReadFile(file("proof"))
	fmt.Printf("\n%s\n", proof)
	fmt.Printf("Poke it:\n  export KUBECONFIG=%s\n  %s get gwp -o wide\n  %s get gwi core.%s -o yaml\n\nStop it (removes everything it made):\n  make demo-down\n",
		kc, strings.TrimSpace(string(kubectl)), strings.TrimSpace(string(kubectl)), hostName)
	return nil
}

func down() error {
	pid := running()
	if pid == 0 {
		fmt.Println("demo: not running")
		_ = os.RemoveAll(stateDir())
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 600 && running() != 0; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if running() != 0 {
		return fmt.Errorf("the demo (pid %d) did not stop", pid)
	}
	systemdhost.SweepStale()
	left, _ := systemdhost.Leftovers()
	_ = os.RemoveAll(stateDir())
	_ = os.Remove(filepath.Join(agentruntime.SampleDir, agentruntime.SampleFile))
	if len(left) > 0 {
		return fmt.Errorf("left behind: %v", left)
	}
	fmt.Println("demo: stopped; nothing left running or mounted")
	return nil
}

// serve runs the demo until SIGTERM.
func serve() error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	say := func(m string) { fmt.Println("demo: " + m) }
	bin := file("bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	say("building the manager, node agent and launcher")
	if err := stack.Build(bin); err != nil {
		return err
	}
	var agentArgs []string
	guest := os.Getenv("GATEWAY_MICROVM_GUEST")
	if guest != "" {
		// One pre-booted VM waits for a tool run; each run takes it and the agent boots the next.
		agentArgs = []string{"--microvm-guest=" + guest, "--microvm-work-dir=" + microVMDir, "--microvm-pool-size=1"}
	}
	s, err := stack.Up(stack.Options{Hosts: []string{hostName}, Dir: stateDir(), BinDir: bin, Progress: say, AgentArgs: agentArgs})
	if err != nil {
		return err
	}
	defer func() {
		say("stopping")
		if err := s.Down(); err != nil {
			say("stop: " + err.Error())
		}
	}()
	if err := os.WriteFile(file("admin.kubeconfig"), mustRead(s.AdminKubeconfig), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(file("kubectl"), []byte(s.CP.Kubectl()), 0o644); err != nil {
		return err
	}
	say("kubectl apply -f config/samples/")
	if out, err := s.Kubectl("apply", "-f", "config/samples/"); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	} else {
		fmt.Print(out)
	}
	say("waiting until core and api are aligned on " + hostName)
	for _, p := range []string{"core", "api"} {
		if err := waitAligned(ctx, s, p); err != nil {
			return err
		}
	}
	text := proofText(ctx, s)
	if guest != "" {
		say("core's gateway sends untrusted code to its tool-run socket")
		text += toolRunText(ctx, s)
	}
	if err := os.WriteFile(file("proof"), []byte(text), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(file("ready"), nil, 0o644); err != nil {
		return err
	}
	say("ready")
	<-ctx.Done()
	return nil
}

func mustRead(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

func waitAligned(ctx context.Context, s *stack.Stack, name string) error {
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		var p v1.GatewayProfile
		if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: name}, &p); err == nil &&
			p.Status.Desired > 0 && p.Status.Aligned == p.Status.Desired && meta.IsStatusConditionTrue(p.Status.Conditions, v1.ConditionReady) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s did not become aligned; see %s", name, file("agent-"+hostName+".log"))
}

// proofText renders each instance's alignment proof for a person.
func proofText(ctx context.Context, s *stack.Stack) string {
	var list v1.GatewayInstanceList
	if err := s.CP.Client.List(ctx, &list); err != nil {
		return err.Error()
	}
	var b strings.Builder
	b.WriteString("Alignment proof, read by the agent from each running gateway:\n")
	for _, gi := range list.Items {
		a := gi.Status.Alignment
		if a == nil {
			continue
		}
		fmt.Fprintf(&b, "  %s: main PID %d, PYTHONPATH=%s -> %s, sha256 %s, cwd %s, unit clean=%v, siblings unchanged=%v\n",
			gi.Name, gi.Status.MainPID, a.PythonPath, a.RuntimePath, a.ReleaseSHA256[:12], a.Cwd, a.UnitClean, a.SiblingsUnchanged)
		if iso := gi.Status.Isolation; iso != nil {
			// The message names the exposure score and the first failed check, if any.
			fmt.Fprintf(&b, "    isolation: %s\n", iso.Message)
		}
	}
	return b.String()
}

// toolRunText asks core's running gateway to escalate a command to a microVM through the node
// agent's socket, and renders what came back. The agent's pool boots its VM when the agent
// starts: while that VM is not ready yet a run boots cold, and the demo asks again.
func toolRunText(ctx context.Context, s *stack.Stack) string {
	status := filepath.Join(s.Hosts[hostName].Root, "opt/agent/gateways/core/home/run/status.sock")
	req := microvm.Request{Command: []string{"sh", "-c", "echo \"$(uname -sr), uid $(id -u), interfaces: $(ls /sys/class/net)\""}}
	var reply *agentruntime.ToolRunReply
	for range 10 {
		var err error
		reply, err = agentruntime.ToolRun(ctx, status, "", req)
		if err != nil {
			return "\nTool run: " + err.Error() + "\n"
		}
		if reply.ConnectError != "" {
			return "\nTool run: " + reply.ConnectError + "\n"
		}
		if reply.Start == microvm.StartWarm {
			break
		}
		time.Sleep(2 * time.Second)
	}
	start := string(reply.Start)
	if reply.ColdReason != "" {
		start += " (" + reply.ColdReason + ")"
	}
	return fmt.Sprintf("\nTool run from core's gateway via $AGENT_HOME/run/%s, in a QEMU microVM:\n  %s (exit %d) in %d ms from a %s VM: %s",
		microvm.SocketName, reply.Phase, reply.ExitCode, reply.DurationMillis, start, reply.Stdout)
}
