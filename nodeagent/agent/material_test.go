package agent_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
)

// TestAgentAppliesOnlyTheMaterialItWasGiven: an instance whose Secret is missing, or whose
// Secret no longer matches the instance's digest, is not applied: the instance's Ready says
// why, its status is not counted as an answer to the spec, and no value appears in it or in an
// event. With the digest the controller would write, the gateway starts with the material and
// the proof names its digest.
func TestAgentAppliesOnlyTheMaterialItWasGiven(t *testing.T) {
	ctx := context.Background()
	c := cp.Client
	const ns, value = "agent-material", "agent-test-secret-4e1d"
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	srv := agentruntime.Serve(t)
	r1 := agentruntime.MustBuild(t, agentruntime.Options{Version: "1.0.0"})
	startAgent(t, "node-m")

	gi := newInstance("vault", "node-m", r1, srv.Add("r1.tar.gz", r1.Data))
	gi.Spec.Env = []v1.EnvVar{{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: "creds", Key: "token"}}}}
	gi.Spec.Material = &v1.MaterialSource{Namespace: ns, Digest: "sha256:" + strings.Repeat("0", 64)}
	if err := c.Create(ctx, gi); err != nil {
		t.Fatal(err)
	}
	waitReady := func(reason string) {
		t.Helper()
		eventually(t, "Ready=False "+reason, func() (bool, string) {
			var got v1.GatewayInstance
			if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got); err != nil {
				return false, err.Error()
			}
			r := condition(&got, v1.ConditionReady)
			if r == nil {
				return false, "no Ready"
			}
			if got.Status.ObservedGeneration == got.Generation || got.Status.MainPID != 0 {
				t.Fatalf("applied material it must not: %+v", got.Status)
			}
			return r.Status == metav1.ConditionFalse && r.Reason == reason, r.Reason + ": " + r.Message
		})
	}
	waitReady(v1.ReasonMaterialNotFound)

	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "creds", Labels: map[string]string{v1.MaterialLabel: "true"}}, Data: map[string][]byte{"token": []byte(value)}}
	if err := c.Create(ctx, sec); err != nil {
		t.Fatal(err)
	}
	waitReady(agent.ReasonMaterialChanged)

	m, err := v1.ResolveMaterial(&gi.Spec.GatewaySettings, map[string]*corev1.Secret{"creds": sec}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKeyFromObject(gi), gi); err != nil {
		t.Fatal(err)
	}
	gi.Spec.Material.Digest = m.Digest
	if err := c.Update(ctx, gi); err != nil {
		t.Fatal(err)
	}
	var got v1.GatewayInstance
	eventually(t, "vault aligned with the material", func() (bool, string) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got); err != nil {
			return false, err.Error()
		}
		a := condition(&got, v1.ConditionAligned)
		return a != nil && a.Status == metav1.ConditionTrue && got.Status.ObservedGeneration == got.Generation, fmt.Sprintf("%+v", got.Status)
	})
	if got.Status.Alignment == nil || got.Status.Alignment.MaterialDigest != m.Digest {
		t.Errorf("the proof names material %+v; want %s", got.Status.Alignment, m.Digest)
	}

	// The Secret rotates; the controller has not rolled it to this host yet. The host, asked to
	// look again, still runs this spec, proven, and says so.
	sec.Data = map[string][]byte{"token": []byte(value + "-rotated")}
	if err := c.Update(ctx, sec); err != nil {
		t.Fatal(err)
	}
	base := got.DeepCopy()
	got.Annotations = map[string]string{v1.AnnotationRetry: "after-rotation"}
	if err := c.Patch(ctx, &got, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the retry answered", func() (bool, string) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got); err != nil {
			return false, err.Error()
		}
		return got.Status.LastHandledRetry == "after-rotation", got.Status.LastHandledRetry
	})
	if r := condition(&got, v1.ConditionReady); r == nil || r.Status != metav1.ConditionTrue {
		t.Errorf("a proven host reports %+v while a rotation waits to reach it", r)
	}
	var evs eventsv1.EventList
	if err := c.List(ctx, &evs); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal([]any{got, evs})
	if strings.Contains(string(b), value) {
		t.Errorf("the secret value is in the instance or an event")
	}
	if err := c.Delete(ctx, &got); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the instance released", func() (bool, string) {
		err := c.Get(ctx, client.ObjectKeyFromObject(gi), &got)
		return err != nil, fmt.Sprint(err)
	})
}
