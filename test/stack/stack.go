// Package stack runs the whole system on one machine: a real kube-apiserver and etcd with the
// CRDs, RBAC and admission policies of config/, the controller manager binary under its own
// identity, and one node agent binary per sandboxed systemd host, each under its host's own
// identity. The end-to-end tests and `make demo` use it.
package stack

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/repo"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// Identities the components run as, the way config/ grants them.
const (
	ManagerUser = "system:serviceaccount:gateway-operator-system:gateway-operator-manager"
	AgentGroup  = "system:gateway-agents"
	AgentPrefix = "system:gateway-agent:"
)

// Options shape a stack.
type Options struct {
	// Hosts are the names of the sandboxed hosts, one agent each.
	Hosts []string
	// Dir holds kubeconfigs, logs and the hosts' root folders.
	Dir string
	// BinDir holds the manager, nodeagent and launch binaries (see Build).
	BinDir string
	// HostGracePeriod is passed to the manager.
	HostGracePeriod time.Duration
	// Progress, if set, is told what is happening.
	Progress func(string)
	// ManagerMetricsAddr is the manager's metrics listen address; off when empty.
	ManagerMetricsAddr string
	// AgentArgs are extra flags for every node agent.
	AgentArgs []string
}

// Stack is a running system.
type Stack struct {
	CP *controlplane.Env
	// Hosts by name.
	Hosts map[string]*systemdhost.Host
	// AdminKubeconfig is a kubeconfig for an administrator.
	AdminKubeconfig string
	// ManagerPID is the controller manager's process.
	ManagerPID int
	opts       Options
	procs      []*exec.Cmd
}

// Build compiles the binaries the stack runs into dir.
func Build(dir string) error { return repo.Build(dir, "manager", "nodeagent", "launch") }

// Up starts everything. On error, what was started is stopped again.
func Up(o Options) (s *Stack, err error) {
	say := func(m string) {
		if o.Progress != nil {
			o.Progress(m)
		}
	}
	s = &Stack{Hosts: map[string]*systemdhost.Host{}, opts: o}
	defer func() {
		if err != nil {
			_ = s.Down()
			s = nil
		}
	}()
	say("starting kube-apiserver and etcd")
	if s.CP, err = controlplane.Start(); err != nil {
		return s, err
	}
	if s.AdminKubeconfig, err = s.kubeconfig("gateway-admin", "system:masters"); err != nil {
		return s, err
	}
	say("installing RBAC and admission policies from config/")
	for _, args := range [][]string{
		{"apply", "-f", "config/manager/namespace.yaml"},
		{"apply", "-k", "config/rbac"},
		{"apply", "-k", "config/policies"},
	} {
		if out, err := s.Kubectl(args...); err != nil {
			return s, fmt.Errorf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	if err := agentruntime.PlaceSample(); err != nil {
		return s, fmt.Errorf("place the sample release: %w", err)
	}

	say("starting the controller manager")
	mkc, err := s.kubeconfig(ManagerUser)
	if err != nil {
		return s, err
	}
	grace := o.HostGracePeriod
	if grace == 0 {
		grace = 40 * time.Second
	}
	metrics := o.ManagerMetricsAddr
	if metrics == "" {
		metrics = "0"
	}
	if err := s.start("manager", filepath.Join(o.BinDir, "manager"), "--kubeconfig="+mkc,
		"--leader-elect", "--leader-election-namespace=gateway-operator-system",
		"--metrics-bind-address="+metrics, "--pprof="+fmt.Sprint(metrics != "0"), "--health-probe-bind-address=0", "--host-grace-period="+grace.String()); err != nil {
		return s, err
	}
	s.ManagerPID = s.procs[len(s.procs)-1].Process.Pid
	for _, name := range o.Hosts {
		say("booting sandboxed systemd host " + name)
		h, err := systemdhost.Boot(systemdhost.Options{Name: name, Dir: o.Dir})
		if h != nil {
			s.Hosts[name] = h
		}
		if err != nil {
			return s, err
		}
		akc, err := s.kubeconfig(AgentPrefix+name, AgentGroup)
		if err != nil {
			return s, err
		}
		say("starting the node agent of " + name)
		args := append([]string{"--kubeconfig=" + akc,
			"--host-name=" + name, "--root=" + h.Root, "--dbus-address=" + h.BusAddress,
			fmt.Sprintf("--proc-root=/proc/%d/root/proc", h.PID), "--launcher=" + filepath.Join(o.BinDir, "launch"),
			"--heartbeat-interval=5s", "--metrics-bind-address=0", "--health-probe-bind-address=0"}, o.AgentArgs...)
		if err := s.start("agent-"+name, filepath.Join(o.BinDir, "nodeagent"), args...); err != nil {
			return s, err
		}
	}
	// A host whose first heartbeat has not landed counts as unreachable, and a rollout moves
	// it at once as a host that serves nothing: tests start from a fleet that is all in view.
	say("waiting until every host is reachable")
	deadline := time.Now().Add(time.Minute)
	for _, name := range o.Hosts {
		for {
			var h v1.GatewayHost
			err := s.CP.Client.Get(context.Background(), client.ObjectKey{Name: name}, &h)
			if err == nil && meta.IsStatusConditionTrue(h.Status.Conditions, v1.ConditionReachable) {
				break
			}
			if time.Now().After(deadline) {
				return s, fmt.Errorf("host %s not reachable within a minute (%v)", name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return s, nil
}

// kubeconfig writes a kubeconfig for a new identity and returns its path.
func (s *Stack) kubeconfig(user string, groups ...string) (string, error) {
	return s.CP.Kubeconfig(s.opts.Dir, user, groups...)
}

// start runs a binary in the background; its output goes to Dir/<name>.log.
func (s *Stack) start(name, bin string, args ...string) error {
	log, err := os.Create(filepath.Join(s.opts.Dir, name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	// If the process that started the stack dies, its components die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	log.Close()
	s.procs = append(s.procs, cmd)
	return nil
}

// Log returns what a component (manager, agent-<host>) wrote.
func (s *Stack) Log(name string) string {
	b, _ := os.ReadFile(filepath.Join(s.opts.Dir, name+".log"))
	return string(b)
}

// Kubectl runs the real kubectl as an administrator, from the repository's root.
func (s *Stack) Kubectl(args ...string) (string, error) {
	root, err := repo.Path(".")
	if err != nil {
		return "", err
	}
	cmd := exec.Command(s.CP.Kubectl(), append([]string{"--kubeconfig=" + s.AdminKubeconfig}, args...)...)
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Down stops the agents and the manager (SIGTERM, then SIGKILL), the hosts and the control
// plane. It is safe to call on a partly started stack.
func (s *Stack) Down() error {
	var errs []error
	for i := len(s.procs) - 1; i >= 0; i-- {
		stop(s.procs[i])
	}
	s.procs = nil
	for _, h := range s.Hosts {
		if err := h.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if s.CP != nil {
		if err := s.CP.Stop(); err != nil {
			errs = append(errs, err)
		}
		s.CP = nil
	}
	return errors.Join(errs...)
}

func stop(cmd *exec.Cmd) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}
