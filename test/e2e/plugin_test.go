package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

// TestPluginPackRestartRollback drives a real host with kubectl gateway alone: a runtime
// folder packed by the plugin is accepted and run by the agent; a restart of one profile
// restarts exactly that unit, proven, its sibling untouched; a rollback returns it.
func TestPluginPackRestartRollback(t *testing.T) {
	s := up(t, "demo")
	bin := t.TempDir()
	if err := repo.Build(bin, "kubectl-gateway"); err != nil {
		t.Fatal(err)
	}
	gateway := func(args ...string) string {
		t.Helper()
		root, err := repo.Path(".")
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(s.CP.Kubectl(), append([]string{"gateway", "--kubeconfig=" + s.AdminKubeconfig}, args...)...)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"))
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Run(); err != nil {
			t.Fatalf("kubectl gateway %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errOut.String())
		}
		return out.String()
	}
	kubectl(t, s, "apply", "-f", "config/samples/")
	for _, p := range []string{"core", "api"} {
		eventually(t, p+" aligned", 3*time.Minute, profileAligned(s, p, "1.0.0", 1))
	}

	// A runtime folder, packed and published with the plugin.
	folder := filepath.Join(t.TempDir(), "runtime")
	if err := os.Mkdir(folder, 0o755); err != nil {
		t.Fatal(err)
	}
	tb := agentruntime.MustBuild(t, agentruntime.Options{Version: "2.0.0"})
	if err := release.Extract(bytes.NewReader(tb.Data), folder, release.Limits{}); err != nil {
		t.Fatal(err)
	}
	drop := dropDir(t)
	tarball := filepath.Join(drop, "agent-runtime-2.0.0.tar.gz")
	manifest := gateway("release", "pack", folder, "--label", "2.0.0", "--url", "file://"+tarball, "-f", tarball)
	if err := os.WriteFile(filepath.Join(drop, "release.yaml"), []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	kubectl(t, s, "apply", "-f", filepath.Join(drop, "release.yaml"))
	if out := gateway("release", "check", tarball); !strings.Contains(out, "accepted") {
		t.Fatalf("release check:\n%s", out)
	}
	kubectl(t, s, "patch", "gwp", "core", "--type=merge", "-p", `{"spec":{"release":"agent-runtime-2.0.0"}}`)
	eventually(t, "core on the packed 2.0.0", 3*time.Minute, profileAligned(s, "core", "2.0.0", 1))
	socket := filepath.Join(s.Hosts["demo"].Root, "opt/agent/gateways/core/home/run/status.sock")
	if st, err := agentruntime.GetStatus(context.Background(), socket); err != nil || st.Version != "2.0.0" {
		t.Fatalf("core does not serve the packed release: %+v %v", st, err)
	}

	// Restart exactly core on demo.
	core, api := mainPIDs(t, s, "core")["demo"], mainPIDs(t, s, "api")["demo"]
	out := gateway("restart", "core", "--host", "demo", "--wait")
	if !strings.Contains(out, "restarted and proven aligned") || !strings.Contains(out, "siblings unchanged") {
		t.Fatalf("restart --wait:\n%s", out)
	}
	if now := mainPIDs(t, s, "core")["demo"]; now == core || now == 0 {
		t.Errorf("core's main PID %d -> %d: not restarted", core, now)
	}
	if now := mainPIDs(t, s, "api")["demo"]; now != api {
		t.Errorf("api was restarted too: %d -> %d", api, now)
	}
	var gi v1.GatewayInstance
	if err := s.CP.Client.Get(context.Background(), client.ObjectKey{Name: "core.demo"}, &gi); err != nil {
		t.Fatal(err)
	}
	if uint32(gi.Status.MainPID) != mainPIDs(t, s, "core")["demo"] || gi.Status.Alignment == nil || !gi.Status.Alignment.SiblingsUnchanged {
		t.Errorf("core.demo's proof is not of the restarted process: %+v", gi.Status)
	}
	// A handled token does not restart again on the next apply.
	restarted := mainPIDs(t, s, "core")["demo"]

	// Back to where the last rollout started.
	out = gateway("rollback", "core", "--wait")
	if !strings.Contains(out, "to agent-runtime-1.0.0") {
		t.Fatalf("rollback --wait:\n%s", out)
	}
	eventually(t, "core back on 1.0.0", 3*time.Minute, profileAligned(s, "core", "1.0.0", 1))
	if st, err := agentruntime.GetStatus(context.Background(), socket); err != nil || st.Version != "1.0.0" {
		t.Errorf("core after the rollback: %+v %v", st, err)
	}
	if now := mainPIDs(t, s, "core")["demo"]; now == restarted {
		t.Errorf("the rollback did not restart core")
	}
	if now := mainPIDs(t, s, "api")["demo"]; now != api {
		t.Errorf("api was restarted: %d -> %d", api, now)
	}
	t.Logf("kubectl gateway status:\n%s", gateway("status"))
	t.Logf("kubectl gateway history core:\n%s", gateway("history", "core"))
}
