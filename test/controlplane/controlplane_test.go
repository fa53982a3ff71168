package controlplane

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// TestAPIServerRestart: a stopped kube-apiserver answers nobody; started again it serves the
// same data on the same address to the same credentials, and can be stopped again.
func TestAPIServerRestart(t *testing.T) {
	e, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Stop(); err != nil {
			t.Error(err)
		}
	})
	ctx := context.Background()
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kept", Namespace: "default"}, Data: map[string]string{"a": "b"}}
	if err := e.Client.Create(ctx, cm); err != nil {
		t.Fatal(err)
	}
	for round := range 2 {
		if err := e.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		if err := e.Client.Get(ctx, client.ObjectKeyFromObject(cm), &corev1.ConfigMap{}); err == nil {
			t.Fatalf("round %d: the API server answers while stopped", round)
		}
		if err := e.StartAPIServer(); err != nil {
			t.Fatal(err)
		}
		var got corev1.ConfigMap
		if err := e.Client.Get(ctx, client.ObjectKeyFromObject(cm), &got); err != nil || got.Data["a"] != "b" {
			t.Fatalf("round %d: after the restart: %v %v", round, got.Data, err)
		}
	}
}
