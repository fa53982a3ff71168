package plugin_test

import (
	"encoding/json"
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// A user with only the viewer role reads everything the plugin shows, and is told plainly
// that actions need the operator role.
func TestViewerReadsButMayNotAct(t *testing.T) {
	mustCreate(t, host("view-1", "view"), host("view-2", "view"), release("view-r1", "1.0.0"), release("view-r0", "0.9.0"),
		profile("view", "view-r1", "view", v1.RolloutStrategy{}))
	ready(t, "view")

	out := gateway(t, viewer, "status", "view")
	for _, want := range []string{"view-r1", "1.0.0", "2/2", "Complete", "view-1", "view-2", "4242"} {
		if !strings.Contains(out, want) {
			t.Errorf("status does not show %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "\x1b[") {
		t.Errorf("status painted colors into a pipe:\n%q", out)
	}
	if got := strings.Count(out, "yes"); got != 4 {
		t.Errorf("status shows %d yes, want aligned and isolated on both hosts:\n%s", got, out)
	}
	// The whole fleet: each host with its profiles.
	all := gateway(t, viewer, "status")
	if !strings.Contains(all, "PROFILES") || !strings.Contains(all, "view-1") {
		t.Errorf("status without a profile lacks the hosts:\n%s", all)
	}

	var list struct {
		Kind  string `json:"kind"`
		Items []struct {
			Kind string `json:"kind"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(gateway(t, viewer, "status", "view", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	if list.Kind != "List" || len(list.Items) != 3 || list.Items[0].Kind != "GatewayProfile" || list.Items[1].Kind != "GatewayInstance" {
		t.Errorf("status -o json: %+v", list)
	}
	if y := gateway(t, viewer, "hosts", "-o", "yaml"); !strings.Contains(y, "kind: GatewayHost") {
		t.Errorf("hosts -o yaml:\n%s", y)
	}
	eventually(t, "heartbeats", func() (bool, string) {
		hb := getHost(t, "view-1").Status.LastHeartbeatTime
		return hb != nil, "no heartbeat yet"
	})
	hosts := gateway(t, viewer, "hosts")
	if !strings.Contains(hosts, "view-1") || !strings.Contains(hosts, "252") || !strings.Contains(hosts, "ago") {
		t.Errorf("hosts:\n%s", hosts)
	}
	proof := gateway(t, viewer, "proof", "view", "--host", "view-2")
	for _, want := range []string{"view on view-2", "Aligned:", "Proven", "/opt/agent/gateways/view/current", "unit sets no PYTHONPATH: ok", "siblings unchanged:      ok"} {
		if !strings.Contains(proof, want) {
			t.Errorf("proof does not show %q:\n%s", want, proof)
		}
	}
	if strings.Contains(proof, "view-1") {
		t.Errorf("proof --host view-2 shows view-1:\n%s", proof)
	}
	if h := gateway(t, viewer, "history", "view"); !strings.Contains(h, "STARTED") {
		t.Errorf("history:\n%s", h)
	}

	for _, args := range [][]string{{"promote", "view"}, {"pause", "view"}, {"rollback", "view", "--to", "view-r0"}, {"cordon", "view-1"}} {
		out, err := kubectl(viewer, append([]string{"gateway"}, args...)...)
		if err == nil {
			t.Errorf("kubectl gateway %s succeeded for a viewer:\n%s", strings.Join(args, " "), out)
			continue
		}
		if !strings.Contains(out, "permission denied") || !strings.Contains(out, "gateway-operator-operator") || !strings.Contains(out, `"vera"`) {
			t.Errorf("kubectl gateway %s: the refusal does not explain itself:\n%s", strings.Join(args, " "), out)
		}
	}
	if gp := getProfile(t, "view"); gp.Annotations[v1.AnnotationPromote] != "" || gp.Spec.Rollout.Paused {
		t.Errorf("a refused action changed the profile: %v %v", gp.Annotations, gp.Spec.Rollout)
	}
}

func TestCordon(t *testing.T) {
	mustCreate(t, host("cordon-1", "cordon"))
	if out := gateway(t, operator, "cordon", "cordon-1"); !strings.Contains(out, "cordoned") {
		t.Errorf("cordon: %s", out)
	}
	if !getHost(t, "cordon-1").Spec.Unschedulable {
		t.Fatal("cordon did not set spec.unschedulable")
	}
	if out := gateway(t, operator, "hosts"); !strings.Contains(out, "yes") {
		t.Errorf("hosts does not show the cordon:\n%s", out)
	}
	gateway(t, operator, "uncordon", "cordon-1")
	if getHost(t, "cordon-1").Spec.Unschedulable {
		t.Fatal("uncordon did not clear spec.unschedulable")
	}
}

func TestEveryVerbHasHelpWithAnExample(t *testing.T) {
	for _, verb := range []string{"status", "proof", "history", "hosts", "cordon", "uncordon", "promote", "resume",
		"abort", "pause", "unpause", "rollback", "render", "restart", "release pack", "release check"} {
		out := gateway(t, viewer, append(strings.Fields(verb), "--help")...)
		if !strings.Contains(out, "Examples:") || !strings.Contains(out, "kubectl gateway "+verb) {
			t.Errorf("kubectl gateway %s --help has no example:\n%s", verb, out)
		}
	}
}
