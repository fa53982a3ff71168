package plugin_test

import (
	"context"
	"strings"
	"testing"

	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// An operator asks for a restart of one instance and waits for its agent's answer; the
// operator may change nothing else on an instance, and a viewer not even that.
func TestRestartRequest(t *testing.T) {
	mustCreate(t, host("restart-1", "restart"), host("restart-2", "restart"), release("restart-r1", "1.0.0"),
		profile("restart", "restart-r1", "restart", v1.RolloutStrategy{}))
	ready(t, "restart")
	instance := func(h string) *v1.GatewayInstance {
		var gi v1.GatewayInstance
		if err := c.Get(context.Background(), client.ObjectKey{Name: v1.InstanceName("restart", h)}, &gi); err != nil {
			t.Fatal(err)
		}
		return &gi
	}
	sibling := instance("restart-2").Annotations[v1.AnnotationRestart]

	out := gateway(t, operator, "restart", "restart", "--host", "restart-1", "--wait")
	if !strings.Contains(out, "restarted and proven aligned: main PID 4242 -> 4243, siblings unchanged") {
		t.Fatalf("restart --wait:\n%s", out)
	}
	gi := instance("restart-1")
	if gi.Status.LastHandledRestart == "" || gi.Status.LastHandledRestart != v1.RequestToken(gi.Annotations[v1.AnnotationRestart]) {
		t.Errorf("restart --wait returned before the agent recorded the token: %q vs %q", gi.Status.LastHandledRestart, gi.Annotations[v1.AnnotationRestart])
	}
	if got := instance("restart-2").Annotations[v1.AnnotationRestart]; got != sibling {
		t.Errorf("restart of restart-1 asked restart-2 too: %q", got)
	}

	// The operator role may patch instances, but the policy lets it touch the restart token only.
	eventually(t, "the instance policy refuses an operator's spec change", func() (bool, string) {
		out, err := kubectl(operator, "patch", "gwi", "restart.restart-1", "--type=merge", "-p", `{"spec":{"release":{"url":"https://evil.example.com/x.tar.gz"}}}`)
		return err != nil && strings.Contains(out, "may change only the gateway.agent.dev/restart annotation"), out
	})
	if out, err := kubectl(operator, "annotate", "--overwrite", "gwi", "restart.restart-1", "gateway.agent.dev/retry=x"); err == nil {
		t.Errorf("an operator set another annotation on an instance:\n%s", out)
	}
	if out, err := kubectl(operator, "delete", "gwi", "restart.restart-1"); err == nil || !strings.Contains(out, "forbidden") {
		t.Errorf("an operator deleted an instance: %v\n%s", err, out)
	}
	if got := instance("restart-1").Spec.Release.URL; strings.Contains(got, "evil") {
		t.Fatalf("the spec changed: %s", got)
	}
	out, err := kubectl(viewer, "gateway", "restart", "restart", "--host", "restart-1")
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("a viewer restarted an instance: %v\n%s", err, out)
	}
}
