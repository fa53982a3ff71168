package scripts_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// TestLintShellRefusesEarlyExitReadersUnderPipefail shows that hack/lint-shell.sh (run by make
// test) catches the class of bug that made the control-plane check flaky, and passes the form
// that replaced it.
func TestLintShellRefusesEarlyExitReadersUnderPipefail(t *testing.T) {
	if _, err := exec.LookPath("shellcheck"); err != nil {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" {
			t.Fatal("shellcheck is missing (hack/host-deps.sh installs it), and GATEWAY_TEST_REQUIRE_ALL is set")
		}
		t.Skip("shellcheck is missing")
	}
	lint, err := repo.Path("hack/lint-shell.sh")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/usr/bin/env bash\nset -euo pipefail\n"+body), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bad := map[string]string{
		"grep-q.sh":   "kubectl version --client | grep -q 'Client Version'\n",
		"grep-qx.sh":  "kube-apiserver --version | grep -qx 'Kubernetes v1'\n",
		"grep-m.sh":   "dmesg | grep -m1 error\n",
		"head.sh":     "ls -l / | head -n 1\n",
		"awk-exit.sh": "apt-cache depends x | awk '/Depends/ {print $2; exit}'\n",
	}
	for name, body := range bad {
		p := write(name, body)
		out, err := exec.Command(lint, p).CombinedOutput()
		if err == nil {
			t.Errorf("%s: lint passed a pipeline into an early-exit reader under pipefail:\n%s", name, body)
		} else if !strings.Contains(string(out), "may exit early") {
			t.Errorf("%s: lint failed without naming the pipeline:\n%s", name, out)
		}
	}
	good := write("good.sh", `out=$(kubectl version --client)
[[ $out == *"Client Version"* ]] || exit 1
tail -n 1 /etc/passwd | grep -c root || true
`)
	if out, err := exec.Command(lint, good).CombinedOutput(); err != nil {
		t.Errorf("lint refused a script that reads whole outputs: %v\n%s", err, out)
	}
}
