// Package bootstrap gives a bare-metal host its agent identity: with a bootstrap token issued for
// the host, it asks the cluster's kube-apiserver-client signer for a client certificate of
// system:gateway-agent:<host> in system:gateway-agents, and writes the kubeconfig the agent runs
// with. Renew replaces that certificate before it expires, asking as the agent itself.
package bootstrap

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"
	certificatesv1 "k8s.io/api/certificates/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	gatewayv1alpha1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// DefaultTimeout bounds the wait for a request to be approved and signed.
const DefaultTimeout = 5 * time.Minute

var tokenRE = regexp.MustCompile(`^([a-z0-9]{6})\.([a-z0-9]{16})$`)

// Options say how a host joins.
type Options struct {
	// Token is the bootstrap token, ID.SECRET.
	Token string
	// Server is the API server's URL.
	Server string
	// CAData is the PEM CA bundle the API server's certificate is checked against.
	CAData []byte
	// Host is this host's GatewayHost name.
	Host string
	// Kubeconfig is the kubeconfig to write; CertFile the PEM file, certificate then key, it
	// names as the client certificate and key (default: client.pem beside Kubeconfig).
	Kubeconfig, CertFile string
	// Timeout bounds the wait for approval and signing (default DefaultTimeout).
	Timeout time.Duration
}

// Bootstrap gets the host's certificate with the bootstrap token and writes CertFile and then
// Kubeconfig, each atomically and 0600.
func Bootstrap(ctx context.Context, o Options) error {
	m := tokenRE.FindStringSubmatch(o.Token)
	if m == nil {
		return errors.New("the token is not a bootstrap token ID.SECRET (6 and 16 lowercase letters or digits)")
	}
	if err := gatewayv1alpha1.ValidateHostName(o.Host); err != nil {
		return err
	}
	if !strings.HasPrefix(o.Server, "https://") {
		return fmt.Errorf("server %q is not an https:// URL", o.Server)
	}
	if len(o.CAData) == 0 {
		return errors.New("no CA to check the API server's certificate against")
	}
	if o.Kubeconfig == "" {
		return errors.New("no kubeconfig path to write")
	}
	if o.CertFile == "" {
		o.CertFile = filepath.Join(filepath.Dir(o.Kubeconfig), "client.pem")
	}
	certFile, err := filepath.Abs(o.CertFile)
	if err != nil {
		return err
	}
	cfg := &rest.Config{Host: o.Server, BearerToken: o.Token, TLSClientConfig: rest.TLSClientConfig{CAData: o.CAData}}
	pemBytes, err := request(ctx, cfg, o.Host, o.Timeout, func(err error) error {
		switch {
		case apierrors.IsUnauthorized(err):
			return fmt.Errorf("the API server refused bootstrap token %s: it does not exist, has expired or was revoked", m[1])
		case apierrors.IsForbidden(err):
			return fmt.Errorf("bootstrap token %s may not request certificates (is %s in its auth-extra-groups?): %w", m[1], gatewayv1alpha1.AgentBootstrapGroup, err)
		}
		return err
	})
	if err != nil {
		return err
	}
	if err := renameio.WriteFile(certFile, pemBytes, 0o600); err != nil {
		return err
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["cluster"] = &clientcmdapi.Cluster{Server: o.Server, CertificateAuthorityData: o.CAData}
	kc.AuthInfos["agent"] = &clientcmdapi.AuthInfo{ClientCertificate: certFile, ClientKey: certFile}
	kc.Contexts["agent"] = &clientcmdapi.Context{Cluster: "cluster", AuthInfo: "agent"}
	kc.CurrentContext = "agent"
	b, err := clientcmd.Write(*kc)
	if err != nil {
		return err
	}
	return renameio.WriteFile(o.Kubeconfig, b, 0o600)
}

// Renew replaces the certificate in certFile with a new one for the same identity and a new
// key, requested with cfg (which authenticates as the current certificate). client-go reloads
// a client certificate file it was given when the file changes, so running clients pick the
// new one up.
func Renew(ctx context.Context, cfg *rest.Config, certFile, host string, timeout time.Duration) error {
	cert, err := readCert(certFile)
	if err != nil {
		return err
	}
	if want := gatewayv1alpha1.AgentUserPrefix + host; cert.Subject.CommonName != want {
		return fmt.Errorf("%s holds a certificate for %q, not %q: not renewing it", certFile, cert.Subject.CommonName, want)
	}
	pemBytes, err := request(ctx, cfg, host, timeout, func(err error) error { return err })
	if err != nil {
		return err
	}
	return renameio.WriteFile(certFile, pemBytes, 0o600)
}

// RenewAt is when a certificate is renewed: after two thirds of its lifetime, leaving a third
// for retries.
func RenewAt(cert *x509.Certificate) time.Time {
	life := cert.NotAfter.Sub(cert.NotBefore)
	return cert.NotBefore.Add(life * 2 / 3)
}

// Renewer keeps an agent's client certificate renewed: at RenewAt of the certificate in
// CertFile it asks for a new one, again and again, until its context ends.
type Renewer struct {
	// Config authenticates as the current certificate (it names CertFile).
	Config *rest.Config
	// CertFile holds the certificate and its key; Host is the agent's host.
	CertFile, Host string
	Log            logr.Logger
	// At says when a certificate is due; nil means RenewAt.
	At func(*x509.Certificate) time.Time
	// Retry is the wait after a failed renewal; zero means a minute.
	Retry time.Duration
}

// Run renews until ctx ends.
func (r *Renewer) Run(ctx context.Context) {
	at, retry := r.At, r.Retry
	if at == nil {
		at = RenewAt
	}
	if retry <= 0 {
		retry = time.Minute
	}
	for {
		wait := retry
		if cert, err := readCert(r.CertFile); err != nil {
			r.Log.Error(err, "reading the client certificate")
		} else {
			wait = time.Until(at(cert))
			if wait > 0 {
				r.Log.Info("client certificate renewal scheduled", "at", at(cert).UTC(), "expires", cert.NotAfter.UTC())
			}
		}
		if wait <= 0 {
			err := Renew(ctx, r.Config, r.CertFile, r.Host, DefaultTimeout)
			if err == nil {
				r.Log.Info("client certificate renewed")
				continue
			}
			r.Log.Error(err, "renewing the client certificate", "retryIn", retry)
			wait = retry
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func readCert(certFile string) (*x509.Certificate, error) {
	b, err := os.ReadFile(certFile) //nolint:gosec // the agent's own certificate file, from its kubeconfig
	if err != nil {
		return nil, err
	}
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("%s holds no certificate", certFile)
		}
		if block.Type == "CERTIFICATE" {
			return x509.ParseCertificate(block.Bytes)
		}
	}
}

// request creates a key and a certificate signing request for the host's agent identity, waits
// for it to be approved and signed, and returns the certificate and the key as PEM. explain
// rewrites the error of the create.
func request(ctx context.Context, cfg *rest.Config, host string, timeout time.Duration, explain func(error) error) ([]byte, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: gatewayv1alpha1.AgentUserPrefix + host, Organization: []string{gatewayv1alpha1.AgentGroup}},
	}, key)
	if err != nil {
		return nil, err
	}
	csr, err := cs.CertificatesV1().CertificateSigningRequests().Create(ctx, &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "gateway-agent-" + host + "-"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: certificatesv1.KubeAPIServerClientSignerName,
			Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create a certificate signing request: %w", explain(err))
	}
	var certPEM []byte
	for certPEM == nil {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("certificate signing request %s was not approved and signed within %s (is the gateway-operator manager running?)", csr.Name, timeout)
		case <-time.After(500 * time.Millisecond):
		}
		got, err := cs.CertificatesV1().CertificateSigningRequests().Get(ctx, csr.Name, metav1.GetOptions{})
		if err != nil {
			if ctx.Err() != nil {
				continue
			}
			return nil, fmt.Errorf("read certificate signing request %s: %w", csr.Name, err)
		}
		for _, c := range got.Status.Conditions {
			if c.Type == certificatesv1.CertificateDenied || c.Type == certificatesv1.CertificateFailed {
				return nil, fmt.Errorf("certificate signing request %s was %s: %s", csr.Name, strings.ToLower(string(c.Type)), c.Message)
			}
		}
		if len(got.Status.Certificate) > 0 {
			certPEM = got.Status.Certificate
		}
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("certificate signing request %s holds no PEM certificate", csr.Name)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, err
	}
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return nil, fmt.Errorf("certificate signing request %s holds a certificate for another key", csr.Name)
	}
	kd, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	out.Write(certPEM)
	_ = pem.Encode(&out, &pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
	return out.Bytes(), nil
}
