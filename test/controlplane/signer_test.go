package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestBootstrapSigner: with Options.Bootstrap a bootstrap token authenticates, and an approved
// kube-apiserver-client request is signed by kube-controller-manager with a certificate the API
// server accepts.
func TestBootstrapSigner(t *testing.T) {
	e, err := StartWith(Options{Bootstrap: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(e.ControllerManagerLog())
		}
		if err := e.Stop(); err != nil {
			t.Error(err)
		}
	})
	ctx := context.Background()
	admin := kubernetes.NewForConfigOrDie(e.Config)
	_, err = admin.CoreV1().Secrets("kube-system").Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-abcdef", Namespace: "kube-system"},
		Type:       "bootstrap.kubernetes.io/token",
		StringData: map[string]string{"token-id": "abcdef", "token-secret": "0123456789abcdef", "usage-bootstrap-authentication": "true"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	anon := rest.AnonymousClientConfig(e.Config)
	tok := rest.CopyConfig(anon)
	tok.BearerToken = "abcdef.0123456789abcdef"
	who, err := kubernetes.NewForConfigOrDie(tok).AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the bootstrap token does not authenticate: %v", err)
	}
	if got := who.Status.UserInfo.Username; got != "system:bootstrap:abcdef" {
		t.Fatalf("the bootstrap token authenticates as %q", got)
	}

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "signed-user", Organization: []string{"signed-group"}}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := admin.CertificatesV1().CertificateSigningRequests().Create(ctx, &certificatesv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{Name: "signer-test"},
		Spec: certificatesv1.CertificateSigningRequestSpec{
			Request:    pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}),
			SignerName: certificatesv1.KubeAPIServerClientSignerName,
			Usages:     []certificatesv1.KeyUsage{certificatesv1.UsageClientAuth},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	csr.Status.Conditions = append(csr.Status.Conditions, certificatesv1.CertificateSigningRequestCondition{
		Type: certificatesv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "Test"})
	if _, err := admin.CertificatesV1().CertificateSigningRequests().UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var certPEM []byte
	for deadline := time.Now().Add(time.Minute); certPEM == nil; time.Sleep(200 * time.Millisecond) {
		got, err := admin.CertificatesV1().CertificateSigningRequests().Get(ctx, csr.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Status.Certificate) > 0 {
			certPEM = got.Status.Certificate
		} else if time.Now().After(deadline) {
			t.Fatalf("kube-controller-manager did not sign the approved request in a minute: %+v", got.Status)
		}
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	user := rest.CopyConfig(anon)
	user.CertData, user.KeyData = certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
	who, err = kubernetes.NewForConfigOrDie(user).AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("the signed certificate does not authenticate: %v", err)
	}
	if got := who.Status.UserInfo; got.Username != "signed-user" || len(got.Groups) == 0 || got.Groups[0] != "signed-group" {
		t.Fatalf("the signed certificate authenticates as %+v", got)
	}
}
