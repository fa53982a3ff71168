// Package stack runs the whole system on one machine: a real kube-apiserver and etcd with the
// CRDs, RBAC and admission policies of config/, the controller manager binary under its own
// identity, and one node agent binary per sandboxed systemd host, each under its host's own
// identity. The end-to-end tests and `make demo` use it.
package stack

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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
	// ManagerReplicas is how many manager processes run (default 1); they elect a leader.
	ManagerReplicas int
	// Bootstrap joins every host as docs/install.md says for a bare-metal host: the control
	// plane gets bootstrap-token authentication and a real kube-controller-manager signer, and
	// each agent's kubeconfig comes from `gateway-nodeagent bootstrap` with a token issued for its
	// host (instead of a certificate the test harness makes).
	Bootstrap bool
}

// Stack is a running system.
type Stack struct {
	CP *controlplane.Env
	// Hosts by name.
	Hosts map[string]*systemdhost.Host
	// AdminKubeconfig is a kubeconfig for an administrator.
	AdminKubeconfig string
	// ManagerPID is the first controller manager replica's process.
	ManagerPID int
	opts       Options
	mu         sync.Mutex
	procs      map[string]*proc
	order      []string // start order; Down stops in reverse
}

// proc is one component process. Like a pod's container under the kubelet, a component that
// exits by itself is started again (a manager exits when it loses its leader lease); one the
// test killed stays down until the test starts it.
type proc struct {
	name, bin string
	args      []string
	cmd       *exec.Cmd
	done      chan struct{} // closed when cmd has been waited for
	down      bool          // killed or stopped on purpose: not started again
	restarts  int
	backoff   time.Duration
}

// Build compiles the binaries the stack runs into dir.
func Build(dir string) error {
	return repo.Build(dir, "manager", "gateway-nodeagent", "gateway-launch")
}

// Up starts everything. On error, what was started is stopped again.
func Up(o Options) (s *Stack, err error) {
	say := func(m string) {
		if o.Progress != nil {
			o.Progress(m)
		}
	}
	s = &Stack{Hosts: map[string]*systemdhost.Host{}, opts: o, procs: map[string]*proc{}}
	defer func() {
		if err != nil {
			_ = s.Down()
			s = nil
		}
	}()
	say("starting kube-apiserver and etcd")
	if s.CP, err = controlplane.StartWith(controlplane.Options{Bootstrap: o.Bootstrap}); err != nil {
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
	for i := range max(o.ManagerReplicas, 1) {
		if i > 0 {
			metrics = "0" // one replica serves metrics
		}
		if err := s.start(ManagerName(i), filepath.Join(o.BinDir, "manager"), "--kubeconfig="+mkc,
			"--leader-elect", "--leader-election-namespace=gateway-operator-system",
			"--metrics-bind-address="+metrics, "--pprof="+fmt.Sprint(metrics != "0"), "--health-probe-bind-address=0", "--host-grace-period="+grace.String()); err != nil {
			return s, err
		}
	}
	s.ManagerPID = s.PID(ManagerName(0))
	for _, name := range o.Hosts {
		say("booting sandboxed systemd host " + name)
		h, err := systemdhost.Boot(systemdhost.Options{Name: name, Dir: o.Dir})
		if h != nil {
			s.Hosts[name] = h
		}
		if err != nil {
			return s, err
		}
		var akc string
		if o.Bootstrap {
			say("joining " + name + " with a bootstrap token")
			akc, err = s.join(name)
		} else {
			akc, err = s.kubeconfig(AgentPrefix+name, AgentGroup)
		}
		if err != nil {
			return s, err
		}
		say("starting the node agent of " + name)
		args := append([]string{"--kubeconfig=" + akc,
			"--host-name=" + name, "--root=" + h.Root, "--dbus-address=" + h.BusAddress,
			fmt.Sprintf("--proc-root=/proc/%d/root/proc", h.PID), "--launcher=" + filepath.Join(o.BinDir, "gateway-launch"),
			"--heartbeat-interval=5s", "--metrics-bind-address=0", "--health-probe-bind-address=0"}, o.AgentArgs...)
		if err := s.start(AgentName(name), filepath.Join(o.BinDir, "gateway-nodeagent"), args...); err != nil {
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

// tokenSecretYAML is the bootstrap token Secret of docs/install.md: ID, secret, host, expiry.
const tokenSecretYAML = `apiVersion: v1
kind: Secret
metadata:
  name: bootstrap-token-%[1]s
  namespace: kube-system
  annotations:
    gateway.agent.dev/host: %[3]s
type: bootstrap.kubernetes.io/token
stringData:
  token-id: %[1]s
  token-secret: %[2]s
  usage-bootstrap-authentication: "true"
  auth-extra-groups: system:bootstrappers:gateway-agent
  expiration: %[4]s
`

// join issues a bootstrap token for host and runs `gateway-nodeagent bootstrap` with it, as
// docs/install.md says; it returns the kubeconfig written.
func (s *Stack) join(host string) (string, error) {
	id, secret := randomToken(6), randomToken(16)
	dir := filepath.Join(s.opts.Dir, "join-"+host)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	secretFile, caFile := filepath.Join(dir, "token.yaml"), filepath.Join(dir, "ca.crt")
	exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	if err := os.WriteFile(secretFile, fmt.Appendf(nil, tokenSecretYAML, id, secret, host, exp), 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(caFile, s.CP.Config.CAData, 0o600); err != nil {
		return "", err
	}
	if out, err := s.Kubectl("apply", "-f", secretFile); err != nil {
		return "", fmt.Errorf("kubectl apply the bootstrap token: %v\n%s", err, out)
	}
	kc := filepath.Join(dir, "kubeconfig")
	cmd := exec.Command(filepath.Join(s.opts.BinDir, "gateway-nodeagent"), "bootstrap",
		"--server="+s.CP.Config.Host, "--ca-file="+caFile, "--host="+host, "--kubeconfig="+kc, "--timeout=1m")
	cmd.Env = append(os.Environ(), "GATEWAY_BOOTSTRAP_TOKEN="+id+"."+secret)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("gateway-nodeagent bootstrap for %s: %v\n%s", host, err, out)
	}
	return kc, nil
}

// randomToken returns n random lowercase letters and digits, as a bootstrap token's parts are.
func randomToken(n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// kubeconfig writes a kubeconfig for a new identity and returns its path.
func (s *Stack) kubeconfig(user string, groups ...string) (string, error) {
	return s.CP.Kubeconfig(s.opts.Dir, user, groups...)
}

// ManagerName names manager replica i (from 0) for Log, PID, Kill and Start.
func ManagerName(i int) string {
	if i == 0 {
		return "manager"
	}
	return fmt.Sprintf("manager-%d", i+1)
}

// AgentName names the node agent of a host for Log, PID, Kill and Start.
func AgentName(host string) string { return "agent-" + host }

// start runs a binary in the background, started again whenever it exits by itself; its
// output goes to Dir/<name>.log.
func (s *Stack) start(name, bin string, args ...string) error {
	p := &proc{name: name, bin: bin, args: args}
	if err := s.run(p); err != nil {
		return err
	}
	s.mu.Lock()
	s.procs[name] = p
	s.order = append(s.order, name)
	s.mu.Unlock()
	return nil
}

// run starts p's process and watches it. Called with s.mu held, or before p is shared.
func (s *Stack) run(p *proc) error {
	log, err := os.OpenFile(filepath.Join(s.opts.Dir, p.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(p.bin, p.args...)
	cmd.Stdout, cmd.Stderr = log, log
	// If the process that started the stack dies, its components die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.down = cmd, done, false
	go func() {
		err := cmd.Wait()
		close(done)
		// Back off as the kubelet does, doubling, but from one second up to ten: short tests.
		s.mu.Lock()
		p.backoff = min(max(2*p.backoff, time.Second), 10*time.Second)
		wait := p.backoff
		s.mu.Unlock()
		time.Sleep(wait)
		s.mu.Lock()
		defer s.mu.Unlock()
		if p.down || p.cmd != cmd {
			return
		}
		p.restarts++
		if f, ferr := os.OpenFile(filepath.Join(s.opts.Dir, p.name+".log"), os.O_WRONLY|os.O_APPEND, 0); ferr == nil {
			fmt.Fprintf(f, "stack: %s exited (%v); starting it again\n", p.name, err)
			f.Close()
		}
		_ = s.run(p)
	}()
	return nil
}

// PID returns the process id of a running component, 0 if it is down.
func (s *Stack) PID(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.procs[name]
	if p == nil || p.down {
		return 0
	}
	select {
	case <-p.done:
		return 0
	default:
		return p.cmd.Process.Pid
	}
}

// Restarts says how often a component was started again after it exited by itself.
func (s *Stack) Restarts(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p := s.procs[name]; p != nil {
		return p.restarts
	}
	return 0
}

// Kill kills a component with SIGKILL, as a crash or the OOM killer would, and waits until it
// is gone. It stays down until Start.
func (s *Stack) Kill(name string) error {
	s.mu.Lock()
	p := s.procs[name]
	if p == nil {
		s.mu.Unlock()
		return fmt.Errorf("no component %s", name)
	}
	p.down = true
	cmd, done := p.cmd, p.done
	s.mu.Unlock()
	_ = cmd.Process.Kill()
	<-done
	return nil
}

// Start starts a killed component again, with the same flags.
func (s *Stack) Start(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.procs[name]
	if p == nil {
		return fmt.Errorf("no component %s", name)
	}
	select {
	case <-p.done:
	default:
		return fmt.Errorf("%s is running", name)
	}
	return s.run(p)
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
	s.mu.Lock()
	order := s.order
	s.order = nil
	for _, p := range s.procs {
		p.down = true
	}
	s.mu.Unlock()
	for i := len(order) - 1; i >= 0; i-- {
		s.mu.Lock()
		p := s.procs[order[i]]
		cmd, done := p.cmd, p.done
		s.mu.Unlock()
		stop(cmd, done)
	}
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

func stop(cmd *exec.Cmd, done <-chan struct{}) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Publish drops a built release into dir (a folder under the agents' file:// drop folder,
// agentruntime.SampleDir) and applies a Release named name for it with kubectl, as a person
// would.
func (s *Stack) Publish(dir, name string, tb *agentruntime.Tarball) error {
	tarball := filepath.Join(dir, name+".tar.gz")
	if err := os.WriteFile(tarball, tb.Data, 0o644); err != nil { //nolint:gosec // agents read release files as root; the mode only mirrors a published file
		return err
	}
	manifest := filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(manifest, []byte(fmt.Sprintf("apiVersion: gateway.agent.dev/v1alpha1\nkind: Release\nmetadata:\n  name: %s\nspec:\n  source:\n    url: file://%s\n  sha256: %s\n  label: %s\n",
		name, tarball, tb.SHA256, tb.Label)), 0o644); err != nil { //nolint:gosec // a manifest, nothing secret
		return err
	}
	if out, err := s.Kubectl("apply", "-f", manifest); err != nil {
		return fmt.Errorf("kubectl apply %s: %v\n%s", manifest, err, out)
	}
	return nil
}
