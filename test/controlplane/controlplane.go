// Package controlplane starts a real kube-apiserver and etcd (through controller-runtime's
// envtest) with this project's CRDs installed. The binaries come from hack/control-plane.sh:
// make test exports KUBEBUILDER_ASSETS; without it the script is run (and builds them once).
//
// Start one control plane per test package, from TestMain: it takes a few seconds to start.
package controlplane

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	gatewayv1alpha1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/repo"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
)

// Env is a running control plane.
type Env struct {
	*envtest.Environment
	// Config reaches the API server as an administrator.
	Config *rest.Config
	// Client is an administrator's client that knows this project's kinds.
	Client client.Client
	// Scheme has the built-in kinds and this project's kinds.
	Scheme *k8sruntime.Scheme
	// BinDir holds kube-apiserver, etcd and kubectl.
	BinDir string
	// apiserver is the kube-apiserver StartAPIServer started, replacing envtest's.
	apiserver *exec.Cmd
	// apiserverArgs is the command line of the stopped kube-apiserver.
	apiserverArgs []string
	// ca issues users' client certificates and, with Options.Bootstrap, signs CSRs.
	ca *clusterCA
	// kcm is kube-controller-manager (Options.Bootstrap), kcmDone closed when it exits, and
	// kcmDir its files.
	kcm     *exec.Cmd
	kcmDone chan struct{}
	kcmDir  string
}

// Options changes what Start starts.
type Options struct {
	// Bootstrap turns on bootstrap-token authentication in kube-apiserver and runs a real
	// kube-controller-manager (hack/controller-manager.sh) with only its CSR signer and bootstrap
	// token cleaner. It signs kubernetes.io/kube-apiserver-client certificates with the CA the
	// API server trusts for client certificates (ClusterCA).
	Bootstrap bool
}

// ClusterCA returns the PEM certificate of the CA the API server trusts for client
// certificates.
func (e *Env) ClusterCA() []byte { return e.ca.certPEM }

// Start starts kube-apiserver and etcd and installs the CRDs from config/crd/bases.
func Start() (*Env, error) { return StartWith(Options{}) }

// StartWith is Start with options.
func StartWith(o Options) (*Env, error) {
	bin, err := binaries()
	if err != nil {
		return nil, err
	}
	crds, err := repo.Path("config/crd/bases")
	if err != nil {
		return nil, err
	}
	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := gatewayv1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	ca, err := newClusterCA()
	if err != nil {
		return nil, err
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{crds},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: bin,
		Scheme:                scheme,
	}
	apiserver := env.ControlPlane.GetAPIServer()
	apiserver.Authn = ca
	if o.Bootstrap {
		apiserver.Configure().Set("enable-bootstrap-token-auth", "true")
	}
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("start kube-apiserver and etcd from %s: %w", bin, err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		_ = env.Stop()
		return nil, err
	}
	e := &Env{Environment: env, Config: cfg, Client: c, Scheme: scheme, BinDir: bin, ca: ca}
	if o.Bootstrap {
		if err := e.startControllerManager(); err != nil {
			_ = e.Stop()
			return nil, err
		}
	}
	return e, nil
}

// Kubectl returns the path of the kubectl built beside the control plane.
func (e *Env) Kubectl() string { return filepath.Join(e.BinDir, "kubectl") }

// GroupResource names one of this project's resources, e.g. GroupResource("gatewayprofiles").
func GroupResource(resource string) schema.GroupResource {
	return schema.GroupResource{Group: gatewayv1alpha1.GroupVersion.Group, Resource: resource}
}

// binaries returns the folder holding kube-apiserver and etcd.
func binaries() (string, error) {
	if dir := os.Getenv("KUBEBUILDER_ASSETS"); dir != "" {
		return dir, nil
	}
	script, err := repo.Path("hack/control-plane.sh")
	if err != nil {
		return "", err
	}
	cmd := exec.Command(script)
	cmd.Stderr = os.Stderr // the first build takes minutes; show its progress
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %w", script, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Kubeconfig writes a kubeconfig for a new user of this control plane (with a client
// certificate; group system:masters makes an administrator) into dir and returns its path.
func (e *Env) Kubeconfig(dir, user string, groups ...string) (string, error) {
	u, err := e.AddUser(envtest.User{Name: user, Groups: groups}, nil)
	if err != nil {
		return "", err
	}
	b, err := u.KubeConfig()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, strings.NewReplacer(":", "-", "/", "-").Replace(user)+".kubeconfig")
	return p, os.WriteFile(p, b, 0o600)
}

// StopAPIServer stops kube-apiserver (SIGTERM, as a node shutdown would) and leaves etcd, its
// data and the certificates alone, for StartAPIServer to start it again the same way.
func (e *Env) StopAPIServer() error {
	if e.apiserverArgs != nil {
		return errors.New("kube-apiserver is already stopped")
	}
	var pid int
	var args []string
	if e.apiserver != nil {
		pid, args = e.apiserver.Process.Pid, e.apiserver.Args
	} else {
		var err error
		if pid, args, err = e.findAPIServer(); err != nil {
			return err
		}
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("stop kube-apiserver %d: %w", pid, err)
	}
	if e.apiserver != nil {
		done := make(chan struct{})
		go func() { _ = e.apiserver.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = e.apiserver.Process.Kill()
			<-done
		}
		e.apiserver = nil
	} else if err := waitGone(pid); err != nil {
		return err
	}
	e.apiserverArgs = args
	return nil
}

// StartAPIServer starts kube-apiserver again after StopAPIServer, on the same address with
// the same certificates and etcd, and waits until it is ready.
func (e *Env) StartAPIServer() error {
	if e.apiserverArgs == nil {
		return errors.New("kube-apiserver was not stopped")
	}
	cmd := exec.Command(e.apiserverArgs[0], e.apiserverArgs[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start kube-apiserver: %w", err)
	}
	e.apiserver, e.apiserverArgs = cmd, nil
	hc, err := rest.HTTPClientFor(e.Config)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		res, err := hc.Get(strings.TrimRight(e.Config.Host, "/") + "/readyz")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver not ready a minute after its restart (%v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop stops the control plane, including a kube-apiserver started again by StartAPIServer
// and kube-controller-manager.
func (e *Env) Stop() error {
	e.stopControllerManager()
	if e.apiserver != nil {
		_ = e.apiserver.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = e.apiserver.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = e.apiserver.Process.Kill()
			<-done
		}
		e.apiserver = nil
	}
	return e.Environment.Stop()
}

// findAPIServer finds the kube-apiserver envtest started for this Env: a child of this
// process running BinDir/kube-apiserver on the port of Config.Host.
func (e *Env) findAPIServer() (int, []string, error) {
	u, err := url.Parse(e.Config.Host)
	if err != nil {
		return 0, nil, err
	}
	want := filepath.Join(e.BinDir, "kube-apiserver")
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, nil, err
	}
	for _, d := range entries {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue
		}
		// The fields after the command name, which is in parentheses: state, then ppid.
		_, rest, _ := strings.Cut(string(stat), ") ")
		f := strings.Fields(rest)
		if len(f) < 2 || f[1] != strconv.Itoa(os.Getpid()) {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(raw), "\x00"), "\x00")
		if len(args) == 0 || filepath.Clean(args[0]) != filepath.Clean(want) && filepath.Base(args[0]) != "kube-apiserver" {
			continue
		}
		for _, a := range args {
			if a == "--secure-port="+u.Port() {
				return pid, args, nil
			}
		}
	}
	return 0, nil, fmt.Errorf("no kube-apiserver child of this process serves port %s", u.Port())
}

// waitGone waits until a process no longer exists (envtest reaps its own children). A
// kube-apiserver with clients attached may drain for long after SIGTERM although it stopped
// listening at once: after a grace period it is killed.
func waitGone(pid int) error {
	killAt, deadline := time.Now().Add(20*time.Second), time.Now().Add(time.Minute)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(killAt) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver %d still there a minute after SIGTERM and SIGKILL", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}
