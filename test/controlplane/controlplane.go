// Package controlplane starts a real kube-apiserver and etcd (through controller-runtime's
// envtest) with this project's CRDs installed. The binaries come from hack/control-plane.sh:
// make test exports KUBEBUILDER_ASSETS; without it the script is run (and builds them once).
//
// Start one control plane per test package, from TestMain: it takes a few seconds to start.
package controlplane

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

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
}

// Start starts kube-apiserver and etcd and installs the CRDs from config/crd/bases.
func Start() (*Env, error) {
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
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{crds},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: bin,
		Scheme:                scheme,
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
	return &Env{Environment: env, Config: cfg, Client: c, Scheme: scheme, BinDir: bin}, nil
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
