// Package bootstrap_test joins bare-metal hosts through the bootstrap flow against a real
// kube-apiserver with bootstrap-token authentication, a real kube-controller-manager signer, and
// the controller manager (its CSR approver) running under its own shipped role: a token issued
// for a host gets exactly that host's agent identity, and nothing else.
package bootstrap_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	authenticationv1 "k8s.io/api/authentication/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/transport"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
	"github.com/agent-gateway/gateway-operator/nodeagent/bootstrap"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

const managerSA = "system:serviceaccount:gateway-operator-system:gateway-operator-manager"

var (
	cp    *controlplane.Env
	admin client.Client
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	// client-go rereads a client certificate file every five minutes; a test cannot wait that long.
	transport.CertCallbackRefreshDuration = time.Second
	var err error
	if cp, err = controlplane.StartWith(controlplane.Options{Bootstrap: true}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := cp.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop control plane:", err)
		}
	}()
	admin = cp.Client
	ctx := context.Background()
	// The manager's namespace: its Role there (config/rbac/role.yaml) covers profile material.
	if err := admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: controllers.DefaultMaterialNamespace}}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for _, file := range []string{"config/rbac/agent_role.yaml", "config/policies/agent_policy.yaml",
		"config/rbac/role.yaml", "config/rbac/role_binding.yaml"} {
		if err := applyFile(ctx, file); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	for _, h := range []string{"host-a", "host-b"} {
		if err := admin.Create(ctx, &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: h}}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	// The controller manager, as its service account, under config/rbac/role.yaml.
	u, err := cp.AddUser(envtest.User{Name: managerSA, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:gateway-operator-system"}}, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctrl.SetLogger(logr.Discard())
	mgr, err := ctrl.NewManager(u.Config(), ctrl.Options{Scheme: cp.Scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		Cache: cache.Options{ByObject: controllers.MaterialCache(controllers.DefaultMaterialNamespace)}})
	if err == nil {
		err = controllers.Setup(mgr, controllers.Options{HostGracePeriod: time.Minute})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- mgr.Start(mctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			fmt.Fprintln(os.Stderr, "manager:", err)
		}
	}()
	code := m.Run()
	if code != 0 {
		fmt.Fprintln(os.Stderr, cp.ControllerManagerLog())
	}
	return code
}

// applyFile creates every object of a YAML file of the repository as the administrator.
func applyFile(ctx context.Context, rel string) error { return repo.Apply(ctx, admin, rel) }

// issueToken creates a bootstrap token Secret for host, as docs/install.md does, and returns
// the token. It is deleted when the test ends.
func issueToken(t *testing.T, id, host string, expires time.Time, groups string) string {
	t.Helper()
	secret := "0123456789abcdef"
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-" + id, Namespace: "kube-system",
			Annotations: map[string]string{v1.BootstrapTokenHostAnnotation: host}},
		Type: "bootstrap.kubernetes.io/token",
		StringData: map[string]string{"token-id": id, "token-secret": secret,
			"usage-bootstrap-authentication": "true", "auth-extra-groups": groups,
			"expiration": expires.UTC().Format(time.RFC3339)},
	}
	if err := admin.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.IgnoreNotFound(admin.Delete(context.Background(), s)) })
	return id + "." + secret
}

func options(t *testing.T, token, host string) bootstrap.Options {
	return bootstrap.Options{Token: token, Server: cp.Config.Host, CAData: cp.Config.CAData, Host: host,
		Kubeconfig: filepath.Join(t.TempDir(), "kubeconfig"), Timeout: time.Minute}
}

func whoami(t *testing.T, cfg *rest.Config) authenticationv1.UserInfo {
	t.Helper()
	r, err := kubernetes.NewForConfigOrDie(cfg).AuthenticationV1().SelfSubjectReviews().Create(context.Background(), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.UserInfo
}

func heartbeat(c client.Client, host string) error {
	gh := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: host}}
	body := fmt.Sprintf(`{"status":{"lastHeartbeatTime":%q}}`, time.Now().UTC().Format(time.RFC3339))
	return c.Status().Patch(context.Background(), gh, client.RawPatch(types.MergePatchType, []byte(body)))
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s holds no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestJoinAndRenew: host A's token gives host A's agent identity; with it the agent heart-beats
// its own host and is refused on host B's; it renews its certificate as itself, even after the
// token is gone.
func TestJoinAndRenew(t *testing.T) {
	ctx := context.Background()
	token := issueToken(t, "aaaaaa", "host-a", time.Now().Add(time.Hour), v1.AgentBootstrapGroup)
	o := options(t, token, "host-a")
	if err := bootstrap.Bootstrap(ctx, o); err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(filepath.Dir(o.Kubeconfig), "client.pem")
	for _, p := range []string{o.Kubeconfig, certFile} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", p, st.Mode().Perm())
		}
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CertFile != certFile || cfg.KeyFile != certFile {
		t.Fatalf("the kubeconfig names %q and %q, want %s for both (the agent renews that file)", cfg.CertFile, cfg.KeyFile, certFile)
	}
	if who := whoami(t, cfg); who.Username != "system:gateway-agent:host-a" || len(who.Groups) == 0 || who.Groups[0] != v1.AgentGroup {
		t.Fatalf("the certificate authenticates as %+v", who)
	}
	agent, err := client.New(cfg, client.Options{Scheme: cp.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	// The admission policy is loaded asynchronously: wait until it refuses host B's heartbeat.
	poll.Until(t, "host B's heartbeat refused to host A's agent", time.Minute, func() (bool, string) {
		err := heartbeat(agent, "host-b")
		return apierrors.IsForbidden(err), fmt.Sprint(err)
	})
	if err := heartbeat(agent, "host-a"); err != nil {
		t.Fatalf("host A's agent cannot heart-beat host A: %v", err)
	}

	// The agent may ask for nothing but its own identity, and only of the client signer.
	other := csrFor(t, "system:gateway-agent:host-b", certificatesv1.KubeAPIServerClientSignerName)
	cs := kubernetes.NewForConfigOrDie(cfg).CertificatesV1().CertificateSigningRequests()
	created, err := cs.Create(ctx, other, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "host A's request for host B's identity denied", time.Minute, func() (bool, string) {
		got, err := cs.Get(ctx, created.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, c := range got.Status.Conditions {
			if c.Type == certificatesv1.CertificateDenied && strings.Contains(c.Message, `may get only CN="system:gateway-agent:host-a"`) {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", got.Status.Conditions)
	})
	if _, err := cs.Create(ctx, csrFor(t, "system:gateway-agent:host-a", certificatesv1.KubeletServingSignerName), metav1.CreateOptions{}); !apierrors.IsForbidden(err) ||
		!strings.Contains(err.Error(), "kubernetes.io/kube-apiserver-client signer") {
		t.Fatalf("host A's agent asking the kubelet-serving signer: %v", err)
	}

	// Renewal: as the agent, with the token revoked.
	first := readCert(t, certFile)
	if err := admin.Delete(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-aaaaaa", Namespace: "kube-system"}}); err != nil {
		t.Fatal(err)
	}
	if err := bootstrap.Renew(ctx, cfg, certFile, "host-a", time.Minute); err != nil {
		t.Fatal(err)
	}
	second := readCert(t, certFile)
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 || second.Subject.CommonName != first.Subject.CommonName {
		t.Fatalf("renewal gave serial %v CN %q (before: %v %q)", second.SerialNumber, second.Subject.CommonName, first.SerialNumber, first.Subject.CommonName)
	}
	if st, err := os.Stat(certFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("after renewal %s: %v %v", certFile, st, err)
	}
	renewed, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	if who := whoami(t, renewed); who.Username != "system:gateway-agent:host-a" {
		t.Fatalf("the renewed certificate authenticates as %+v", who)
	}
	// The agent's renewer does the same when the certificate is due.
	third := func() *x509.Certificate {
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		r := &bootstrap.Renewer{Config: renewed, CertFile: certFile, Host: "host-a", Log: logr.Discard(), Retry: time.Second,
			At: func(c *x509.Certificate) time.Time {
				if c.SerialNumber.Cmp(second.SerialNumber) == 0 {
					return time.Time{} // due now
				}
				return time.Now().Add(time.Hour)
			}}
		go func() { r.Run(rctx); close(done) }()
		defer func() { cancel(); <-done }()
		var c *x509.Certificate
		poll.Until(t, "the renewer replaced the certificate", time.Minute, func() (bool, string) {
			c = readCert(t, certFile)
			return c.SerialNumber.Cmp(second.SerialNumber) != 0, c.SerialNumber.String()
		})
		return c
	}()
	if third.Subject.CommonName != "system:gateway-agent:host-a" {
		t.Fatalf("the renewer got a certificate for %q", third.Subject.CommonName)
	}

	var csrs certificatesv1.CertificateSigningRequestList
	if err := admin.List(ctx, &csrs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range csrs.Items {
		if c.Spec.Username == "system:gateway-agent:host-a" && strings.HasPrefix(c.Name, "gateway-agent-host-a-") {
			found = true
			if len(c.Status.Conditions) == 0 || c.Status.Conditions[0].Type != certificatesv1.CertificateApproved {
				t.Errorf("the renewal request %s: %+v", c.Name, c.Status.Conditions)
			}
		}
	}
	if !found {
		t.Error("no certificate signing request made by the agent itself")
	}
}

func csrFor(t *testing.T, cn, signer string) *certificatesv1.CertificateSigningRequest {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: cn, Organization: []string{v1.AgentGroup}}}, key)
	if err != nil {
		t.Fatal(err)
	}
	usages := []certificatesv1.KeyUsage{certificatesv1.UsageClientAuth}
	if signer == certificatesv1.KubeletServingSignerName {
		usages = []certificatesv1.KeyUsage{certificatesv1.UsageServerAuth}
	}
	return &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "test-"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: signer, Usages: usages,
		},
	}
}

// TestTokenForAnotherHost: a token issued for host A cannot get host B's identity.
func TestTokenForAnotherHost(t *testing.T) {
	token := issueToken(t, "bbbbbb", "host-a", time.Now().Add(time.Hour), v1.AgentBootstrapGroup)
	o := options(t, token, "host-b")
	err := bootstrap.Bootstrap(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "was denied") || !strings.Contains(err.Error(), `may get only CN="system:gateway-agent:host-a"`) {
		t.Fatalf("host A's token asking for host B: %v", err)
	}
	if _, err := os.Stat(o.Kubeconfig); !os.IsNotExist(err) {
		t.Fatalf("a kubeconfig was written: %v", err)
	}
}

// TestExpiredToken and TestRevokedToken: the API server refuses the token, and the agent says so.
func TestExpiredToken(t *testing.T) {
	token := issueToken(t, "cccccc", "host-a", time.Now().Add(-time.Minute), v1.AgentBootstrapGroup)
	err := bootstrap.Bootstrap(context.Background(), options(t, token, "host-a"))
	if err == nil || !strings.Contains(err.Error(), "refused bootstrap token cccccc: it does not exist, has expired or was revoked") {
		t.Fatalf("an expired token: %v", err)
	}
}

func TestRevokedToken(t *testing.T) {
	token := issueToken(t, "dddddd", "host-a", time.Now().Add(time.Hour), v1.AgentBootstrapGroup)
	if err := admin.Delete(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-dddddd", Namespace: "kube-system"}}); err != nil {
		t.Fatal(err)
	}
	err := bootstrap.Bootstrap(context.Background(), options(t, token, "host-a"))
	if err == nil || !strings.Contains(err.Error(), "refused bootstrap token dddddd: it does not exist, has expired or was revoked") {
		t.Fatalf("a revoked token: %v", err)
	}
}

// TestTokenNotForAgents: a bootstrap token without the gateway agents' group may not even ask.
func TestTokenNotForAgents(t *testing.T) {
	token := issueToken(t, "ffffff", "host-a", time.Now().Add(time.Hour), "system:bootstrappers:other")
	err := bootstrap.Bootstrap(context.Background(), options(t, token, "host-a"))
	if err == nil || !strings.Contains(err.Error(), "bootstrap token ffffff may not request certificates") {
		t.Fatalf("a token for something else: %v", err)
	}
}

// TestOthersRequestsLeftAlone: an administrator's request, even for an agent identity, is not
// the approver's to decide (docs/install.md's manual path stays open to administrators).
func TestOthersRequestsLeftAlone(t *testing.T) {
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(cp.Config).CertificatesV1().CertificateSigningRequests()
	mine, err := cs.Create(ctx, csrFor(t, "system:gateway-agent:host-b", certificatesv1.KubeAPIServerClientSignerName), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cs.Delete(context.Background(), mine.Name, metav1.DeleteOptions{}) })
	// A join decided after the administrator's request was created.
	token := issueToken(t, "gggggg", "host-b", time.Now().Add(time.Hour), v1.AgentBootstrapGroup)
	if err := bootstrap.Bootstrap(ctx, options(t, token, "host-b")); err != nil {
		t.Fatal(err)
	}
	got, err := cs.Get(ctx, mine.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Status.Conditions) != 0 {
		t.Fatalf("the approver decided an administrator's request: %+v", got.Status.Conditions)
	}
}

// TestClientRereadsItsCertificateFile: a client made from the kubeconfig bootstrap writes picks
// up a new certificate in the file without being made again, which is how the running agent
// moves to a renewed certificate. To tell the two apart, the new one names another host.
func TestClientRereadsItsCertificateFile(t *testing.T) {
	ctx := context.Background()
	token := issueToken(t, "hhhhhh", "host-c", time.Now().Add(time.Hour), v1.AgentBootstrapGroup)
	o := options(t, token, "host-c")
	if err := bootstrap.Bootstrap(ctx, o); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	// One client for the whole test, as the agent has.
	cs := kubernetes.NewForConfigOrDie(cfg)
	who := func() string {
		r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			return err.Error()
		}
		return r.Status.UserInfo.Username
	}
	if u := who(); u != "system:gateway-agent:host-c" {
		t.Fatalf("the certificate authenticates as %s", u)
	}
	other, err := cp.AddUser(envtest.User{Name: "system:gateway-agent:host-z", Groups: []string{v1.AgentGroup}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	next := filepath.Join(filepath.Dir(cfg.CertFile), "next.pem")
	if err := os.WriteFile(next, append(append([]byte{}, other.Config().CertData...), other.Config().KeyData...), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, cfg.CertFile); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "the client presents the certificate now in the file", time.Minute, func() (bool, string) {
		u := who()
		return u == "system:gateway-agent:host-z", u
	})
}
