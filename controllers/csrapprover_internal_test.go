package controllers

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

var approverNow = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

func tokenSecret(id, host, expiration, groups string) *corev1.Secret {
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-" + id, Namespace: "kube-system",
			Annotations: map[string]string{"gateway.agent.dev/host": host}},
		Type: "bootstrap.kubernetes.io/token",
		Data: map[string][]byte{"token-id": []byte(id), "token-secret": []byte("0123456789abcdef"),
			"usage-bootstrap-authentication": []byte("true"), "auth-extra-groups": []byte(groups)},
	}
	if expiration != "" {
		s.Data["expiration"] = []byte(expiration)
	}
	if host == "" {
		s.Annotations = nil
	}
	return s
}

type csrCase struct {
	user   string
	groups []string
	sub    pkix.Name
	dns    []string
	usages []certificatesv1.KeyUsage
	rsa    int
}

func (c csrCase) build(t *testing.T) *certificatesv1.CertificateSigningRequest {
	t.Helper()
	var key any
	if c.rsa > 0 {
		k, err := rsa.GenerateKey(rand.Reader, c.rsa)
		if err != nil {
			t.Fatal(err)
		}
		key = k
	} else {
		key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: c.sub, DNSNames: c.dns}, key)
	if err != nil {
		t.Fatal(err)
	}
	if c.usages == nil {
		c.usages = []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature, certificatesv1.UsageClientAuth}
	}
	return &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "r"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: certificatesv1.KubeAPIServerClientSignerName,
			Usages:     c.usages, Username: c.user, Groups: c.groups,
		},
	}
}

// TestCSRApproverCheck: exactly the identity of the token's host (or of the renewing agent) is
// approved; everything else is refused with a reason that says what is wrong.
func TestCSRApproverCheck(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	const grp = "system:bootstrappers:gateway-agent"
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(
		tokenSecret("aaaaaa", "host-a", "2031-01-01T00:00:00Z", "system:bootstrappers:other,"+grp),
		tokenSecret("eeeeee", "host-a", "2029-12-31T23:59:59Z", grp),
		tokenSecret("nohost", "", "", grp),
		tokenSecret("nogrpx", "host-a", "", "system:bootstrappers:other"),
	).Build()
	r := &CSRApprover{Client: c, APIReader: c, Now: func() time.Time { return approverNow }}
	agentA := pkix.Name{CommonName: "system:gateway-agent:host-a", Organization: []string{"system:gateway-agents"}}
	boot := func(id string) (string, []string) {
		return "system:bootstrap:" + id, []string{"system:bootstrappers", grp, "system:authenticated"}
	}
	u, g := boot("aaaaaa")
	cases := []struct {
		name string
		c    csrCase
		want string // "" approves; else a part of the refusal
	}{
		{"token for its host", csrCase{user: u, groups: g, sub: agentA}, ""},
		{"rsa key", csrCase{user: u, groups: g, sub: agentA, rsa: 2048}, ""},
		{"token for another host", csrCase{user: u, groups: g, sub: pkix.Name{CommonName: "system:gateway-agent:host-b", Organization: []string{"system:gateway-agents"}}}, `may get only CN="system:gateway-agent:host-a"`},
		{"extra organization", csrCase{user: u, groups: g, sub: pkix.Name{CommonName: agentA.CommonName, Organization: []string{"system:gateway-agents", "system:masters"}}}, "may get only"},
		{"no organization", csrCase{user: u, groups: g, sub: pkix.Name{CommonName: agentA.CommonName}}, "may get only"},
		{"organizational unit", csrCase{user: u, groups: g, sub: pkix.Name{CommonName: agentA.CommonName, Organization: agentA.Organization, OrganizationalUnit: []string{"x"}}}, "fields other than CN and O"},
		{"subject alternative names", csrCase{user: u, groups: g, sub: agentA, dns: []string{"host-a"}}, "subject alternative names"},
		{"server auth", csrCase{user: u, groups: g, sub: agentA, usages: []certificatesv1.KeyUsage{certificatesv1.UsageClientAuth, certificatesv1.UsageServerAuth}}, `usage "server auth"`},
		{"no client auth", csrCase{user: u, groups: g, sub: agentA, usages: []certificatesv1.KeyUsage{certificatesv1.UsageDigitalSignature}}, "lacks usage"},
		{"short rsa key", csrCase{user: u, groups: g, sub: agentA, rsa: 1024}, "shorter than 2048"},
		{"expired token", func() csrCase { u, g := boot("eeeeee"); return csrCase{user: u, groups: g, sub: agentA} }(), "bootstrap token eeeeee expired at 2029-12-31T23:59:59Z"},
		{"revoked token", func() csrCase { u, g := boot("gone00"); return csrCase{user: u, groups: g, sub: agentA} }(), "bootstrap token gone00 no longer exists"},
		{"token without host", func() csrCase { u, g := boot("nohost"); return csrCase{user: u, groups: g, sub: agentA} }(), "names no host"},
		{"token secret without the group", func() csrCase { u, g := boot("nogrpx"); return csrCase{user: u, groups: g, sub: agentA} }(), "does not carry group"},
		{"token not in the group", csrCase{user: u, groups: []string{"system:bootstrappers"}, sub: agentA}, "was not issued for a gateway host"},
		{"renewal", csrCase{user: "system:gateway-agent:host-a", groups: []string{"system:gateway-agents", "system:authenticated"}, sub: agentA}, ""},
		{"renewal for another host", csrCase{user: "system:gateway-agent:host-b", groups: []string{"system:gateway-agents"}, sub: agentA}, `may get only CN="system:gateway-agent:host-b"`},
		{"renewal outside the group", csrCase{user: "system:gateway-agent:host-a", groups: []string{"system:authenticated"}, sub: agentA}, "is not in group"},
		{"renewal with a bad host name", csrCase{user: "system:gateway-agent:Host_A", groups: []string{"system:gateway-agents"}, sub: agentA}, "not a DNS label"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			csr := tc.c.build(t)
			if !judged(csr) {
				t.Fatal("the approver does not judge this request")
			}
			got, err := r.check(context.Background(), csr)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want == "" && got != "" {
				t.Fatalf("refused: %s", got)
			}
			if tc.want != "" && !strings.Contains(got, tc.want) {
				t.Fatalf("refusal %q, want it to say %q", got, tc.want)
			}
		})
	}
}

// TestCSRApproverJudges: requests of other signers, and of other users, are left to others.
func TestCSRApproverJudges(t *testing.T) {
	agentA := pkix.Name{CommonName: "system:gateway-agent:host-a", Organization: []string{"system:gateway-agents"}}
	admin := csrCase{user: "kubernetes-admin", groups: []string{"system:masters"}, sub: agentA}.build(t)
	if judged(admin) {
		t.Error("an administrator's request is judged")
	}
	kubelet := csrCase{user: "system:gateway-agent:host-a", groups: []string{"system:gateway-agents"}, sub: agentA}.build(t)
	kubelet.Spec.SignerName = certificatesv1.KubeAPIServerClientKubeletSignerName
	if judged(kubelet) {
		t.Error("a request for another signer is judged")
	}
	otherToken := csrCase{user: "system:bootstrap:kkkkkk", groups: []string{"system:bootstrappers", "system:bootstrappers:kubeadm:default-node-token"},
		sub: pkix.Name{CommonName: "someone"}}.build(t)
	if judged(otherToken) {
		t.Error("another token's request for another identity is judged")
	}
	otherToken = csrCase{user: "system:bootstrap:kkkkkk", groups: []string{"system:bootstrappers"}, sub: agentA}.build(t)
	if !judged(otherToken) {
		t.Error("another token's request for an agent identity is not judged (it must be denied)")
	}
}
