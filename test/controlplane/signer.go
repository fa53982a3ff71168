package controlplane

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// clusterCA is one CA that the API server trusts for client certificates and that
// kube-controller-manager signs kubernetes.io/kube-apiserver-client CSRs with, as in a cluster
// whose client CA is also its signer. It issues envtest's users too (it is envtest's Authn).
type clusterCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
	keyPEM  []byte
}

var _ envtest.Authn = (*clusterCA)(nil)

func newClusterCA() (*clusterCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "gateway-operator-test-cluster-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	kd, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &clusterCA{
		cert: cert, key: key,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}),
	}, nil
}

// Configure writes the CA where the API server reads its client CAs.
func (c *clusterCA) Configure(workDir string, args *envtest.Arguments) error {
	p := filepath.Join(workDir, "cluster-ca.crt")
	if err := os.WriteFile(p, c.certPEM, 0o600); err != nil {
		return err
	}
	args.Set("client-ca-file", p)
	return nil
}

// Start has nothing to start.
func (c *clusterCA) Start() error { return nil }

// Stop has nothing to stop.
func (c *clusterCA) Stop() error { return nil }

// AddUser issues a client certificate for the user and returns baseCfg with it.
func (c *clusterCA) AddUser(user envtest.User, baseCfg *rest.Config) (*rest.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: user.Name, Organization: user.Groups},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("issue a client certificate for %s: %w", user.Name, err)
	}
	kd, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	cfg := rest.CopyConfig(baseCfg)
	cfg.CertData = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	cfg.KeyData = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
	return cfg, nil
}

// controllerManagerBinary returns kube-controller-manager from hack/controller-manager.sh:
// GATEWAY_CONTROLLER_MANAGER names its folder; without it the script is run (and builds it once).
func controllerManagerBinary() (string, error) {
	dir := os.Getenv("GATEWAY_CONTROLLER_MANAGER")
	if dir == "" {
		script, err := repo.Path("hack/controller-manager.sh")
		if err != nil {
			return "", err
		}
		cmd := exec.Command(script)
		cmd.Stderr = os.Stderr // the first build takes minutes; show its progress
		out, err := cmd.Output()
		if err != nil {
			return "", fmt.Errorf("%s: %w", script, err)
		}
		dir = strings.TrimSpace(string(out))
	}
	return filepath.Join(dir, "kube-controller-manager"), nil
}

// startControllerManager runs kube-controller-manager with only the CSR signer and the
// bootstrap token cleaner, signing with the cluster CA.
func (e *Env) startControllerManager() error {
	bin, err := controllerManagerBinary()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "kcm-")
	if err != nil {
		return err
	}
	e.kcmDir = dir
	crt, key := filepath.Join(dir, "signer.crt"), filepath.Join(dir, "signer.key")
	if err := os.WriteFile(crt, e.ca.certPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(key, e.ca.keyPEM, 0o600); err != nil {
		return err
	}
	kc, err := e.Kubeconfig(dir, "system:kube-controller-manager", "system:masters")
	if err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(dir, "kube-controller-manager.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin,
		"--kubeconfig="+kc,
		"--controllers=certificatesigningrequest-signing-controller,token-cleaner-controller",
		"--cluster-signing-kube-apiserver-client-cert-file="+crt,
		"--cluster-signing-kube-apiserver-client-key-file="+key,
		"--leader-elect=false",
		"--secure-port=0",
	)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start kube-controller-manager: %w", err)
	}
	e.kcm = cmd
	e.kcmDone = make(chan struct{})
	go func() { _ = cmd.Wait(); close(e.kcmDone) }()
	return nil
}

// ControllerManagerLog returns what kube-controller-manager wrote so far (for a failing test).
func (e *Env) ControllerManagerLog() string {
	if e.kcmDir == "" {
		return ""
	}
	b, _ := os.ReadFile(filepath.Join(e.kcmDir, "kube-controller-manager.log"))
	return string(b)
}

// stopControllerManager stops kube-controller-manager and removes its files.
func (e *Env) stopControllerManager() {
	if e.kcm != nil {
		_ = e.kcm.Process.Signal(syscall.SIGTERM)
		select {
		case <-e.kcmDone:
		case <-time.After(20 * time.Second):
			_ = e.kcm.Process.Kill()
			<-e.kcmDone
		}
		e.kcm = nil
	}
	if e.kcmDir != "" {
		_ = os.RemoveAll(e.kcmDir)
		e.kcmDir = ""
	}
}
