package controllers

import (
	"strings"
	"testing"
	"unsafe"

	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// The cache's transform drops managedFields and leaves every other field as it was, but two
// instances then share one copy of the strings they repeat.
func TestCacheTransformSharesStrings(t *testing.T) {
	// Each instance gets its own copies of every string, as two decoded watch events do.
	fresh := func(host string) *v1.GatewayInstance {
		c := func(s string) string { return strings.Clone(s) }
		gi := &v1.GatewayInstance{ObjectMeta: metav1.ObjectMeta{Name: "core." + host,
			Labels:        map[string]string{c(v1.LabelProfile): c("core"), c(v1.LabelHost): host},
			Finalizers:    []string{c(v1.FinalizerInstanceUnits)},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "manager"}}}}
		gi.Spec.Profile, gi.Spec.Host = c("core"), host
		gi.Spec.Release = v1.ReleaseArtifact{Name: c("r1"), URL: c("https://example.com/r.tar.gz"), SHA256: c(strings.Repeat("a", 64)), Label: c("1.0.0")}
		gi.Status.CurrentRelease = &v1.ReleaseSummary{Name: c("r1"), Label: c("1.0.0"), SHA256: c(strings.Repeat("a", 64))}
		gi.Status.Conditions = []metav1.Condition{{Type: c(v1.ConditionAligned), Status: metav1.ConditionTrue, Reason: c("Proven")}}
		return gi
	}
	tr := CacheTransform()
	a, b := fresh("node-a"), fresh("node-b")
	want := a.DeepCopy()
	want.ManagedFields = nil
	for _, gi := range []*v1.GatewayInstance{a, b} {
		if _, err := tr(gi); err != nil {
			t.Fatal(err)
		}
	}
	if !equality.Semantic.DeepEqual(a, want) {
		t.Errorf("the transform changed the instance:\n%+v\nwant\n%+v", a, want)
	}
	same := func(what, x, y string) {
		if unsafe.StringData(x) != unsafe.StringData(y) { //nolint:gosec // compares addresses only: do the two share their bytes
			t.Errorf("%s: two copies", what)
		}
	}
	same("spec.release.sha256", a.Spec.Release.SHA256, b.Spec.Release.SHA256)
	same("status.currentRelease.sha256", a.Status.CurrentRelease.SHA256, b.Spec.Release.SHA256)
	same("spec.release.url", a.Spec.Release.URL, b.Spec.Release.URL)
	same("condition reason", a.Status.Conditions[0].Reason, b.Status.Conditions[0].Reason)
	same("finalizer", a.Finalizers[0], b.Finalizers[0])
	for k := range b.Labels {
		if k == v1.LabelProfile {
			same("label value", a.Labels[k], b.Labels[k])
		}
	}
}
