package controllers

import (
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/predicate"

	gatewayv1alpha1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// +kubebuilder:rbac:groups=certificates.k8s.io,resources=certificatesigningrequests,verbs=get;list;watch
// +kubebuilder:rbac:groups=certificates.k8s.io,resources=certificatesigningrequests/approval,verbs=update
// +kubebuilder:rbac:groups=certificates.k8s.io,resources=signers,resourceNames=kubernetes.io/kube-apiserver-client,verbs=approve
// +kubebuilder:rbac:groups="",namespace=kube-system,resources=secrets,verbs=get

const (
	bootstrapUserPrefix = "system:bootstrap:"
	// BootstrapTokenSecretType is the type of a bootstrap token Secret.
	bootstrapTokenSecretType = "bootstrap.kubernetes.io/token" //nolint:gosec // a Secret type, not a credential
	// ApprovedReason and DeniedReason are the reasons of this approver's conditions.
	approvedReason = "GatewayAgentIdentity"
	deniedReason   = "GatewayAgentIdentityRefused"
)

var tokenIDRE = regexp.MustCompile(`^[a-z0-9]{6}$`)

// CSRApprover approves the client certificates of bare-metal node agents, as Kubernetes
// approves kubelets': a request made with a bootstrap token issued for host H (its Secret
// carries the gateway.agent.dev/host annotation) may get exactly system:gateway-agent:H in
// system:gateway-agents, and an agent may renew its own identity. Every other request for the
// kube-apiserver-client signer made by a bootstrap token or an agent is denied, with the reason;
// requests made by anyone else are left to other approvers (or to an administrator).
type CSRApprover struct {
	Client client.Client
	// APIReader reads bootstrap token Secrets one by one (get in kube-system only; they are
	// never listed or cached).
	APIReader client.Reader
	// Now is the clock token expiry is checked against; nil means time.Now.
	Now func() time.Time
}

// SetupWithManager registers the approver.
func (r *CSRApprover) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("csr-approver").
		For(&certificatesv1.CertificateSigningRequest{}, builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
			csr, ok := o.(*certificatesv1.CertificateSigningRequest)
			return ok && judged(csr) && !decided(csr)
		}))).
		Complete(r)
}

// judged says whether this approver decides a request: one for the kube-apiserver-client signer
// from an agent, or from a bootstrap token that is for agents or asks for an agent's identity.
func judged(csr *certificatesv1.CertificateSigningRequest) bool {
	if csr.Spec.SignerName != certificatesv1.KubeAPIServerClientSignerName {
		return false
	}
	u := csr.Spec.Username
	switch {
	case strings.HasPrefix(u, gatewayv1alpha1.AgentUserPrefix):
		return true
	case strings.HasPrefix(u, bootstrapUserPrefix):
		if slices.Contains(csr.Spec.Groups, gatewayv1alpha1.AgentBootstrapGroup) {
			return true
		}
		req, err := parseCSR(csr.Spec.Request)
		return err != nil || strings.HasPrefix(req.Subject.CommonName, gatewayv1alpha1.AgentUserPrefix) ||
			slices.Contains(req.Subject.Organization, gatewayv1alpha1.AgentGroup)
	}
	return false
}

func decided(csr *certificatesv1.CertificateSigningRequest) bool {
	for _, c := range csr.Status.Conditions {
		if c.Type == certificatesv1.CertificateApproved || c.Type == certificatesv1.CertificateDenied {
			return true
		}
	}
	return false
}

// Reconcile approves or denies one request.
func (r *CSRApprover) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var csr certificatesv1.CertificateSigningRequest
	if err := r.Client.Get(ctx, req.NamespacedName, &csr); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !judged(&csr) || decided(&csr) {
		return ctrl.Result{}, nil
	}
	refusal, err := r.check(ctx, &csr)
	if err != nil {
		return ctrl.Result{}, err
	}
	cond := certificatesv1.CertificateSigningRequestCondition{
		Type: certificatesv1.CertificateApproved, Status: corev1.ConditionTrue,
		Reason:  approvedReason,
		Message: "the requested identity is the one the requester's token or certificate was issued for",
	}
	if refusal != "" {
		cond = certificatesv1.CertificateSigningRequestCondition{
			Type: certificatesv1.CertificateDenied, Status: corev1.ConditionTrue,
			Reason: deniedReason, Message: refusal,
		}
	}
	cond.LastUpdateTime = metav1.Now()
	csr.Status.Conditions = append(csr.Status.Conditions, cond)
	if err := r.Client.SubResource("approval").Update(ctx, &csr); err != nil {
		return ctrl.Result{}, fmt.Errorf("%s certificate signing request %s: %w", strings.ToLower(string(cond.Type)), csr.Name, err)
	}
	ctrl.LoggerFrom(ctx).Info("decided an agent's certificate signing request", "decision", cond.Type,
		"requester", csr.Spec.Username, "reason", cond.Message)
	return ctrl.Result{}, nil
}

// check returns why the request must be denied, or "" to approve it. An error is transient.
func (r *CSRApprover) check(ctx context.Context, csr *certificatesv1.CertificateSigningRequest) (string, error) {
	var host string
	switch u := csr.Spec.Username; {
	case strings.HasPrefix(u, gatewayv1alpha1.AgentUserPrefix):
		host = strings.TrimPrefix(u, gatewayv1alpha1.AgentUserPrefix)
		if !slices.Contains(csr.Spec.Groups, gatewayv1alpha1.AgentGroup) {
			return fmt.Sprintf("requester %s is not in group %s", u, gatewayv1alpha1.AgentGroup), nil
		}
	default:
		id := strings.TrimPrefix(u, bootstrapUserPrefix)
		var why string
		var err error
		if host, why, err = r.tokenHost(ctx, id, csr.Spec.Groups); err != nil || why != "" {
			return why, err
		}
	}
	if err := gatewayv1alpha1.ValidateHostName(host); err != nil {
		return err.Error(), nil //nolint:nilerr // an invalid host name is a refusal, not a failure to retry
	}
	return checkRequest(csr, host), nil
}

// tokenHost returns the host bootstrap token id was issued for, or why it gives none.
func (r *CSRApprover) tokenHost(ctx context.Context, id string, groups []string) (string, string, error) {
	if !tokenIDRE.MatchString(id) {
		return "", fmt.Sprintf("%q is not a bootstrap token ID", id), nil
	}
	if !slices.Contains(groups, gatewayv1alpha1.AgentBootstrapGroup) {
		return "", fmt.Sprintf("bootstrap token %s is not in group %s: it was not issued for a gateway host", id, gatewayv1alpha1.AgentBootstrapGroup), nil
	}
	var s corev1.Secret
	err := r.APIReader.Get(ctx, client.ObjectKey{Namespace: metav1.NamespaceSystem, Name: "bootstrap-token-" + id}, &s)
	if apierrors.IsNotFound(err) {
		return "", fmt.Sprintf("bootstrap token %s no longer exists: it was revoked or has expired", id), nil
	}
	if err != nil {
		return "", "", err
	}
	switch {
	case s.Type != bootstrapTokenSecretType:
		return "", fmt.Sprintf("secret kube-system/%s is not of type %s", s.Name, bootstrapTokenSecretType), nil
	case string(s.Data["token-id"]) != id:
		return "", fmt.Sprintf("secret kube-system/%s is not bootstrap token %s", s.Name, id), nil
	case string(s.Data["usage-bootstrap-authentication"]) != "true":
		return "", fmt.Sprintf("bootstrap token %s is not for authentication", id), nil
	}
	if exp := string(s.Data["expiration"]); exp != "" {
		t, err := time.Parse(time.RFC3339, exp)
		if err != nil {
			return "", fmt.Sprintf("bootstrap token %s has an unreadable expiration %q", id, exp), nil //nolint:nilerr // a refusal, not a failure to retry
		}
		now := time.Now
		if r.Now != nil {
			now = r.Now
		}
		if !now().Before(t) {
			return "", fmt.Sprintf("bootstrap token %s expired at %s", id, t.UTC().Format(time.RFC3339)), nil
		}
	}
	extra := strings.Split(string(s.Data["auth-extra-groups"]), ",")
	if !slices.Contains(extra, gatewayv1alpha1.AgentBootstrapGroup) {
		return "", fmt.Sprintf("bootstrap token %s does not carry group %s", id, gatewayv1alpha1.AgentBootstrapGroup), nil
	}
	host := s.Annotations[gatewayv1alpha1.BootstrapTokenHostAnnotation]
	if host == "" {
		return "", fmt.Sprintf("bootstrap token %s names no host (annotation %s)", id, gatewayv1alpha1.BootstrapTokenHostAnnotation), nil
	}
	return host, "", nil
}

// checkRequest returns why the request is not exactly an agent client certificate for host.
func checkRequest(csr *certificatesv1.CertificateSigningRequest, host string) string {
	req, err := parseCSR(csr.Spec.Request)
	if err != nil {
		return err.Error()
	}
	want := gatewayv1alpha1.AgentUserPrefix + host
	sub := req.Subject
	if sub.CommonName != want || !slices.Equal(sub.Organization, []string{gatewayv1alpha1.AgentGroup}) {
		return fmt.Sprintf("the request asks for CN=%q O=%q; this requester may get only CN=%q O=[%q]",
			sub.CommonName, sub.Organization, want, gatewayv1alpha1.AgentGroup)
	}
	if len(sub.OrganizationalUnit)+len(sub.Country)+len(sub.Locality)+len(sub.Province)+len(sub.StreetAddress)+
		len(sub.PostalCode)+len(sub.ExtraNames) > 0 || sub.SerialNumber != "" {
		return "the request's subject has fields other than CN and O"
	}
	if len(req.DNSNames)+len(req.EmailAddresses)+len(req.IPAddresses)+len(req.URIs) > 0 {
		return "the request has subject alternative names; an agent's client certificate has none"
	}
	switch k := req.PublicKey.(type) {
	case *ecdsa.PublicKey:
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return "the request's RSA key is shorter than 2048 bits"
		}
	default:
		return fmt.Sprintf("the request's key type %T is not ECDSA or RSA", k)
	}
	hasClientAuth := false
	for _, u := range csr.Spec.Usages {
		switch u {
		case certificatesv1.UsageClientAuth:
			hasClientAuth = true
		case certificatesv1.UsageDigitalSignature, certificatesv1.UsageKeyEncipherment:
		default:
			return fmt.Sprintf("usage %q is not allowed; an agent's certificate is for client auth only", u)
		}
	}
	if !hasClientAuth {
		return "the request lacks usage \"client auth\""
	}
	return ""
}

func parseCSR(b []byte) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("spec.request is not a PEM certificate request")
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("spec.request: %w", err)
	}
	if err := req.CheckSignature(); err != nil {
		return nil, fmt.Errorf("spec.request's signature: %w", err)
	}
	return req, nil
}
