package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/stack"
)

const secretProfiles = `apiVersion: gateway.agent.dev/v1alpha1
kind: GatewayProfile
metadata:
  name: vault
spec:
  release: agent-runtime-1.0.0
  nodeSelector: {matchLabels: {role: secret}}
  env:
  - name: REPORT_SHA256
    value: env:TOKEN,file:config/token
  - name: TOKEN
    valueFrom: {secretKeyRef: {name: gw-creds, key: token}}
  files:
  - path: config/token
    mode: 0400
    secretKeyRef: {name: gw-creds, key: file}
---
apiVersion: gateway.agent.dev/v1alpha1
kind: GatewayProfile
metadata:
  name: plain
spec:
  release: agent-runtime-1.0.0
  nodeSelector: {}
`

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// TestSecretsReachOnlyTheirHosts: a profile with a secret variable and a secret file reaches
// the two hosts it selects, whose gateways read both; the third host's identity is refused the
// Secret; rotating the Secret rolls through both hosts (kubectl wait tells when) while the
// sibling profile keeps running untouched; no object, event or log of the run holds a value.
func TestSecretsReachOnlyTheirHosts(t *testing.T) {
	s := up(t, "sec-a", "sec-b", "sec-c")
	ctx := context.Background()
	const ns = "gateway-operator-system"
	values := []string{"tok-e2e-1-9f8e7d", "file-e2e-1-6c5b4a", "tok-e2e-2-3a2b1c", "file-e2e-2-0d9e8f"}
	for _, h := range []string{"sec-a", "sec-b"} {
		kubectl(t, s, "label", "gatewayhost", h, "role=secret")
	}
	kubectl(t, s, "create", "secret", "generic", "gw-creds", "-n", ns, "--from-literal=token="+values[0], "--from-literal=file="+values[1])
	kubectl(t, s, "label", "secret", "gw-creds", "-n", ns, v1.MaterialLabel+"=true")
	kubectl(t, s, "apply", "-f", "config/samples/release.yaml")
	manifest := filepath.Join(t.TempDir(), "profiles.yaml")
	if err := os.WriteFile(manifest, []byte(secretProfiles), 0o600); err != nil {
		t.Fatal(err)
	}
	kubectl(t, s, "apply", "-f", manifest)
	eventually(t, "vault aligned on 2 hosts", 3*time.Minute, profileAligned(s, "vault", "1.0.0", 2))
	eventually(t, "plain aligned on 3 hosts", 3*time.Minute, profileAligned(s, "plain", "1.0.0", 3))

	reads := func(token, file string) {
		t.Helper()
		for _, h := range []string{"sec-a", "sec-b"} {
			st, err := agentruntime.GetStatus(ctx, filepath.Join(s.Hosts[h].Root, "opt/agent/gateways/vault/home/run/status.sock"))
			if err != nil {
				t.Fatalf("status of vault on %s: %v", h, err)
			}
			if st.Read["env:TOKEN"] != sha(token) || st.Read["file:config/token"] != sha(file) {
				t.Errorf("vault on %s read %v; want the sha256 of the current values", h, st.Read)
			}
			var gi v1.GatewayInstance
			if err := s.CP.Client.Get(ctx, client.ObjectKey{Name: "vault." + h}, &gi); err != nil {
				t.Fatal(err)
			}
			if gi.Spec.Material == nil || gi.Status.Alignment == nil || gi.Status.Alignment.MaterialDigest != gi.Spec.Material.Digest {
				t.Errorf("vault.%s: the proof does not name the instance's material digest: spec %+v, proof %+v", h, gi.Spec.Material, gi.Status.Alignment)
			}
		}
	}
	reads(values[0], values[1])

	// The unselected host's own identity: no get, list or watch of the Secret.
	agent := func(h string) client.WithWatch {
		u, err := s.CP.AddUser(envtest.User{Name: stack.AgentPrefix + h, Groups: []string{stack.AgentGroup}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.NewWithWatch(u.Config(), client.Options{Scheme: s.CP.Scheme})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := agent("sec-c")
	var sec corev1.Secret
	err := c.Get(ctx, client.ObjectKey{Namespace: ns, Name: "gw-creds"}, &sec)
	lerr := c.List(ctx, &corev1.SecretList{}, client.InNamespace(ns))
	w, werr := c.Watch(ctx, &corev1.SecretList{}, client.InNamespace(ns), client.MatchingFields{"metadata.name": "gw-creds"})
	if werr == nil {
		w.Stop()
	}
	if !apierrors.IsForbidden(err) || !apierrors.IsForbidden(lerr) || !apierrors.IsForbidden(werr) {
		t.Errorf("sec-c: get %v, list %v, watch %v; want each Forbidden", err, lerr, werr)
	}
	if err := agent("sec-a").Get(ctx, client.ObjectKey{Namespace: ns, Name: "gw-creds"}, &sec); err != nil {
		t.Errorf("sec-a, which runs vault, cannot get its Secret: %v", err)
	}

	// Rotation, waited for with kubectl as a person would.
	plain := mainPIDs(t, s, "plain")
	kubectl(t, s, "patch", "secret", "gw-creds", "-n", ns, "--type=merge", "-p",
		fmt.Sprintf(`{"stringData":{"token":%q,"file":%q}}`, values[2], values[3]))
	rv := kubectl(t, s, "get", "secret", "gw-creds", "-n", ns, "-o", "jsonpath={.metadata.resourceVersion}")
	kubectl(t, s, "wait", "gwp/vault", "--timeout=2m",
		`--for=jsonpath={.status.material.objects[?(@.name=="gw-creds")].resourceVersion}=`+rv)
	kubectl(t, s, "wait", "gwp/vault", "--for=condition=Ready", "--timeout=3m")
	reads(values[2], values[3])
	if now := mainPIDs(t, s, "plain"); fmt.Sprint(now) != fmt.Sprint(plain) {
		t.Errorf("the sibling profile was restarted by the rotation: %v -> %v", plain, now)
	}

	// Leak grep: every kind the API lists (Secrets aside), every event, every component's log
	// and every host's journal.
	var dump strings.Builder
	for _, res := range strings.Fields(kubectl(t, s, "api-resources", "--verbs=list", "-o", "name")) {
		if res == "secrets" {
			continue
		}
		out, err := s.Kubectl("get", res, "-A", "-o", "json")
		if err != nil {
			t.Errorf("kubectl get %s: %v\n%s", res, err, out)
		}
		dump.WriteString(out)
	}
	dump.WriteString(s.Log("manager"))
	for name, h := range s.Hosts {
		dump.WriteString(s.Log("agent-" + name))
		dump.WriteString(h.Journal(""))
	}
	text := dump.String()
	if !strings.Contains(text, "vault.sec-a") || !strings.Contains(text, "gw-creds") {
		t.Fatal("the dump does not hold the run's objects: the grep would prove nothing")
	}
	for _, v := range values {
		for _, form := range []string{v, base64.StdEncoding.EncodeToString([]byte(v)), sha(v)} {
			if i := strings.Index(text, form); i >= 0 {
				t.Errorf("a secret value leaked (as %q): ...%s...", form, text[max(0, i-200):min(len(text), i+200)])
			}
		}
	}
	t.Logf("searched %d bytes of objects, events and logs for %d values", len(text), len(values))
}
