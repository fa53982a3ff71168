package controllers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers"
)

const secretValue = "tok-7f3a9c-not-for-instances"

func materialProfile(name, release, secret string, selector map[string]string) *v1.GatewayProfile {
	p := profile(name, release, selector)
	p.Spec.Env = []v1.EnvVar{{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: secret, Key: "token"}}}}
	p.Spec.Files = []v1.FileSource{{Path: "config/app.yaml", ConfigMapKeyRef: &v1.KeySelector{Name: secret + "-cfg", Key: "app.yaml"}}}
	all := intstr.FromString("100%")
	p.Spec.Rollout.MaxUnavailable = &all
	return p
}

func agentRole(host string) (*rbacv1.Role, error) {
	var r rbacv1.Role
	err := c.Get(context.Background(), client.ObjectKey{Namespace: materialNS, Name: controllers.AgentAccessPrefix + host}, &r)
	return &r, err
}

// TestMaterialDigestRotationAndAccess: an instance carries the material's digest and never a
// value; a rotated Secret changes the digest and config hash; a missing key stalls the profile
// with MaterialNotFound and moves nothing; each selected host gets a Role naming exactly its
// objects and bound to its agent alone, and loses it when it leaves the selection.
func TestMaterialDigestRotationAndAccess(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, host("mat-1", map[string]string{"pool": "mat"}))
	mustCreate(t, host("mat-2", map[string]string{"pool": "other"}))
	simulatedAgentHeartbeats(t, "mat-1", "mat-2")
	mustCreate(t, rel("mat-r1", "1.0.0", shaA))
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "mat-creds", Labels: materialLabels()},
		Data: map[string][]byte{"token": []byte(secretValue)}}
	mustCreate(t, sec)
	mustCreate(t, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "mat-creds-cfg", Labels: materialLabels()},
		Data: map[string]string{"app.yaml": "a: 1\n"}})
	mustCreate(t, materialProfile("mat", "mat-r1", "mat-creds", map[string]string{"pool": "mat"}))

	var first *v1.GatewayInstance
	eventually(t, "instance on mat-1 with a material digest", func() (bool, string) {
		gi, err := getInstance("mat.mat-1")
		if err != nil || gi.Spec.Material == nil {
			return false, fmt.Sprint(err)
		}
		first = gi
		return true, ""
	})
	if first.Spec.Material.Namespace != materialNS || !strings.HasPrefix(first.Spec.Material.Digest, "sha256:") {
		t.Errorf("material = %+v", first.Spec.Material)
	}
	if b, _ := json.Marshal(first); strings.Contains(string(b), secretValue) {
		t.Fatalf("the instance carries the secret value: %s", b)
	}
	eventually(t, "a Role for mat-1 naming its Secret and ConfigMap, none for mat-2", func() (bool, string) {
		r, err := agentRole("mat-1")
		if err != nil {
			return false, err.Error()
		}
		_, err2 := agentRole("mat-2")
		want := []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get"}, ResourceNames: []string{"mat-creds"}},
			{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"get"}, ResourceNames: []string{"mat-creds-cfg"}},
		}
		return fmt.Sprint(r.Rules) == fmt.Sprint(want) && apierrors.IsNotFound(err2), fmt.Sprint(r.Rules, err2)
	})
	var rb rbacv1.RoleBinding
	if err := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "gateway-agent-mat-1"}, &rb); err != nil {
		t.Fatal(err)
	}
	if len(rb.Subjects) != 1 || rb.Subjects[0].Kind != "User" || rb.Subjects[0].Name != "system:gateway-agent:mat-1" ||
		rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != "gateway-agent-mat-1" {
		t.Errorf("binding = %+v", rb)
	}
	simulatedAgentReports(t, "mat.mat-1", true, "")

	// Rotation: a new value is a new digest and config hash on the host.
	sec.Data["token"] = []byte(secretValue + "-2")
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	var rotated *v1.GatewayInstance
	eventually(t, "the rotated digest on mat-1", func() (bool, string) {
		gi, err := getInstance("mat.mat-1")
		if err != nil {
			return false, err.Error()
		}
		rotated = gi
		return gi.Spec.Material.Digest != first.Spec.Material.Digest, gi.Spec.Material.Digest
	})
	if rotated.Spec.ConfigHash == first.Spec.ConfigHash {
		t.Error("a rotated Secret kept the config hash")
	}
	eventually(t, "the profile's status to name the rotated Secret's version", func() (bool, string) {
		m := getProfile(t, "mat").Status.Material
		return m != nil && m.Digest == rotated.Spec.Material.Digest && len(m.Objects) == 2 &&
			m.Objects[0] == v1.MaterialObject{Kind: "Secret", Name: "mat-creds", ResourceVersion: sec.ResourceVersion}, fmt.Sprintf("%+v", m)
	})
	simulatedAgentReports(t, "mat.mat-1", true, "")

	// A missing key: the profile says so and the host keeps its spec.
	delete(sec.Data, "token")
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "Ready=False MaterialNotFound on the profile", func() (bool, string) {
		r := meta.FindStatusCondition(getProfile(t, "mat").Status.Conditions, v1.ConditionReady)
		if r == nil {
			return false, "no Ready"
		}
		return r.Status == metav1.ConditionFalse && r.Reason == v1.ReasonMaterialNotFound &&
			strings.Contains(r.Message, `Secret "mat-creds" has no key "token"`), r.Reason + ": " + r.Message
	})
	if gi, _ := getInstance("mat.mat-1"); gi.Spec.ConfigHash != rotated.Spec.ConfigHash {
		t.Error("the instance moved while the material was missing")
	}

	// Leaving the selection ends the host's access even while its unit is being removed.
	if err := editHostLabels(ctx, "mat-1", map[string]string{"pool": "gone"}); err != nil {
		t.Fatal(err)
	}
	sec.Data = map[string][]byte{"token": []byte(secretValue)}
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mat-1's Role and RoleBinding gone", func() (bool, string) {
		_, e1 := agentRole("mat-1")
		e2 := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "gateway-agent-mat-1"}, &rbacv1.RoleBinding{})
		return apierrors.IsNotFound(e1) && apierrors.IsNotFound(e2), fmt.Sprint(e1, e2)
	})
	simulatedAgentRemovesUnit(t, "mat.mat-1")

	// A Role someone widened is put back.
	if err := editHostLabels(ctx, "mat-2", map[string]string{"pool": "mat"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a Role for mat-2", func() (bool, string) { _, err := agentRole("mat-2"); return err == nil, fmt.Sprint(err) })
	// A binding recreated to another role (roleRef is immutable) is replaced.
	// The controller recreates a deleted binding at once, so the swap may lose that race;
	// it is tried again until the foreign binding is in place.
	eventually(t, "a RoleBinding for mat-2 bound to ClusterRole view", func() (bool, string) {
		var rb2 rbacv1.RoleBinding
		if err := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "gateway-agent-mat-2"}, &rb2); err != nil {
			return false, err.Error()
		}
		if err := c.Delete(ctx, &rb2); err != nil && !apierrors.IsNotFound(err) {
			return false, err.Error()
		}
		evil := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: rb2.Name, OwnerReferences: rb2.OwnerReferences,
			Labels: rb2.Labels}, Subjects: rb2.Subjects, RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "view"}}
		if err := c.Create(ctx, evil); err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	eventually(t, "mat-2's RoleBinding bound to its own Role again", func() (bool, string) {
		var cur rbacv1.RoleBinding
		err := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "gateway-agent-mat-2"}, &cur)
		return err == nil && cur.RoleRef == rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "gateway-agent-mat-2"}, fmt.Sprint(cur.RoleRef, err)
	})

	r, _ := agentRole("mat-2")
	r.Rules[0].ResourceNames = append(r.Rules[0].ResourceNames, "someone-elses")
	if err := c.Update(ctx, r); err != nil {
		t.Fatal(err)
	}
	eventually(t, "mat-2's Role narrowed again", func() (bool, string) {
		r, err := agentRole("mat-2")
		return err == nil && !slices.Contains(r.Rules[0].ResourceNames, "someone-elses"), fmt.Sprint(r.Rules, err)
	})
}

func materialLabels() map[string]string { return map[string]string{v1.MaterialLabel: "true"} }

// TestUnlabeledMaterialNeverResolvedNorGranted: a Secret without the material label is
// neither resolved (the profile says to label it) nor named in any host's Role, even when a
// profile that used it while labeled still has its instance.
func TestUnlabeledMaterialNeverResolvedNorGranted(t *testing.T) {
	ctx := context.Background()
	mustCreate(t, host("unl-1", map[string]string{"pool": "unl"}))
	simulatedAgentHeartbeats(t, "unl-1")
	mustCreate(t, rel("unl-r1", "1.0.0", shaA))
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "unl-creds"},
		Data: map[string][]byte{"token": []byte(secretValue)}}
	mustCreate(t, sec)
	mustCreate(t, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "unl-creds-cfg", Labels: materialLabels()},
		Data: map[string]string{"app.yaml": "a: 1\n"}})
	mustCreate(t, materialProfile("unl", "unl-r1", "unl-creds", map[string]string{"pool": "unl"}))

	eventually(t, "Ready=False MaterialNotFound asking to label the Secret", func() (bool, string) {
		r := meta.FindStatusCondition(getProfile(t, "unl").Status.Conditions, v1.ConditionReady)
		if r == nil {
			return false, "no Ready"
		}
		return r.Status == metav1.ConditionFalse && r.Reason == v1.ReasonMaterialNotFound &&
			strings.Contains(r.Message, `Secret "unl-creds" not found or not labeled gateway.agent.dev/material="true"`), r.Reason + ": " + r.Message
	})
	if gi, err := getInstance("unl.unl-1"); err == nil && gi.Spec.Material != nil {
		t.Errorf("an instance carries material of an unlabeled Secret: %+v", gi.Spec.Material)
	}
	if _, err := agentRole("unl-1"); !apierrors.IsNotFound(err) {
		t.Errorf("unl-1 has a Role for an unlabeled Secret: %v", err)
	}

	// Labeled, it is resolved and granted.
	sec.Labels = materialLabels()
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a Role for unl-1 naming the labeled Secret", func() (bool, string) {
		r, err := agentRole("unl-1")
		return err == nil && len(r.Rules) == 2 && slices.Contains(r.Rules[0].ResourceNames, "unl-creds"), fmt.Sprint(r.Rules, err)
	})

	// Unlabeled again: the instance keeps naming it, the grant drops it.
	sec.Labels = nil
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	eventually(t, "unl-1's Role without the unlabeled Secret", func() (bool, string) {
		r, err := agentRole("unl-1")
		if err != nil {
			return false, err.Error()
		}
		for _, rule := range r.Rules {
			if slices.Contains(rule.ResourceNames, "unl-creds") {
				return false, fmt.Sprint(r.Rules)
			}
		}
		return len(r.Rules) == 1 && r.Rules[0].Resources[0] == "configmaps", fmt.Sprint(r.Rules)
	})
	if gi, err := getInstance("unl.unl-1"); err != nil || !slices.Contains(func() []string { s, _ := gi.Spec.MaterialRefs(); return s }(), "unl-creds") {
		t.Errorf("the instance should still name the Secret (so only the grant filter keeps it out): %v", err)
	}
}

func editHostLabels(ctx context.Context, name string, labels map[string]string) error {
	var h v1.GatewayHost
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
		return err
	}
	h.Labels = labels
	return c.Update(ctx, &h)
}
