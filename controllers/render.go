package controllers

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// templateSpec is a profile's instance spec before a host is filled in; its key digests
// everything but the host, once per reconcile rather than once per host. It is pure: the same
// profile and release always give the same specs and hashes.
type templateSpec struct {
	spec v1.GatewayInstanceSpec
	key  string
}

// profileSpec is what a profile asks of every host, given the release it runs and where and
// what its material is (nil when it names none).
func profileSpec(p *v1.GatewayProfile, rel *v1.Release, mat *v1.MaterialSource) templateSpec {
	spec := v1.GatewayInstanceSpec{
		Profile: p.Name,
		Release: v1.ReleaseArtifact{
			Name:   rel.Name,
			URL:    rel.Spec.Source.URL,
			SHA256: rel.Spec.SHA256,
			Label:  rel.Spec.Label,
		},
		GatewaySettings: *p.Spec.GatewaySettings.DeepCopy(),
		AutoRollback:    ptrBool(p.Spec.Rollout.AutoRollback == nil || *p.Spec.Rollout.AutoRollback),
		HealthProbe:     p.Spec.Rollout.HealthProbe.DeepCopy(),
		Material:        mat.DeepCopy(),
	}
	return templateSpec{spec: spec, key: configHash(spec)}
}

// forHost is the spec of one host: the template plus the host, hashed with the host's name.
func (t templateSpec) forHost(host string) v1.GatewayInstanceSpec {
	spec := *t.spec.DeepCopy()
	spec.Host = host
	spec.ConfigHash = t.hashFor(host)
	return spec
}

// hashFor is the config hash of one host's spec, without building the spec.
func (t templateSpec) hashFor(host string) string {
	sum := sha256.Sum256([]byte(t.key + "/" + host))
	return hex.EncodeToString(sum[:])[:16]
}

// configHash digests everything in an instance spec but the hash itself.
func configHash(spec v1.GatewayInstanceSpec) string {
	spec.ConfigHash = ""
	b, _ := json.Marshal(spec) // a struct of strings and lists: cannot fail
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])[:16]
}

// newInstance builds the GatewayInstance of a profile on a host.
func newInstance(p *v1.GatewayProfile, spec v1.GatewayInstanceSpec) *v1.GatewayInstance {
	return &v1.GatewayInstance{
		ObjectMeta: metav1.ObjectMeta{
			Name:       v1.InstanceName(p.Name, spec.Host),
			Labels:     map[string]string{v1.LabelProfile: p.Name, v1.LabelHost: spec.Host},
			Finalizers: []string{v1.FinalizerInstanceUnits},
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(p,
				v1.GroupVersion.WithKind("GatewayProfile"))},
		},
		Spec: spec,
	}
}

func ptrQuantity(s string) *resource.Quantity {
	q := resource.MustParse(s)
	return &q
}

func ptrBool(b bool) *bool { return &b }
