package v1alpha1_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// TestGeneratedFilesUpToDate fails when zz_generated.deepcopy.go, the CRDs or the RBAC role
// were not regenerated after an API change.
func TestGeneratedFilesUpToDate(t *testing.T) {
	if out, err := verifyGenerated(t, ""); err != nil {
		t.Fatalf("generated files are stale (run make generate manifests): %v\n%s", err, out)
	}
}

// TestStaleGeneratedFilesAreDetected changes a field's documentation in a copy of the tree and
// checks that the verification notices.
func TestStaleGeneratedFilesAreDetected(t *testing.T) {
	tree := t.TempDir()
	for _, p := range []string{"go.mod", "go.sum", "api", "controllers", "config", "hack"} {
		src, err := repo.Path(p)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("cp", "-r", src, filepath.Join(tree, p)).CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v %s", p, err, out)
		}
	}
	types := filepath.Join(tree, "api/v1alpha1/release_types.go")
	b, err := os.ReadFile(types)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(b), "// Label names the release for people", "// Label is the release's human name", 1)
	if changed == string(b) {
		t.Fatal("the doc comment to change was not found")
	}
	if err := os.WriteFile(types, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := verifyGenerated(t, tree)
	if err == nil {
		t.Fatalf("a changed API doc comment was not detected as stale CRDs:\n%s", out)
	}
	if !strings.Contains(out, "the release's human name") {
		t.Errorf("the report does not show the difference:\n%s", out)
	}
}

func verifyGenerated(t *testing.T, tree string) (string, error) {
	t.Helper()
	script, err := repo.Path("hack/verify-generated.sh")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{}
	if tree != "" {
		args = append(args, tree)
	}
	out, err := exec.Command(script, args...).CombinedOutput()
	return string(out), err
}
