package release

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestRestagePutsBackAChangedTree changes a file in a staged tree and checks that TreeDigest
// sees it and Restage puts back the artifact's tree, leaving no temporary folder behind.
func TestRestagePutsBackAChangedTree(t *testing.T) {
	s, base := newStore(t)
	data := tgz(t, validEntries()...)
	a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
	dir, err := s.Ensure(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	want, err := TreeDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	var file string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, _ error) error {
		if file == "" && d.Type().IsRegular() {
			file = p
		}
		return nil
	})
	if err := os.Chmod(file, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte("changed"), 0o644); err != nil { //nolint:gosec // a test tree
		t.Fatal(err)
	}
	if got, _ := TreeDigest(dir); got == want {
		t.Fatalf("TreeDigest did not see %s change", file)
	}
	if _, err := s.Restage(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	if got, _ := TreeDigest(dir); got != want {
		t.Errorf("tree after Restage has digest %s, want %s", got, want)
	}
	checkValidTree(t, dir)
	if _, err := os.Lstat(dir + tmpSuffix); !os.IsNotExist(err) {
		t.Errorf("%s left behind (%v)", dir+tmpSuffix, err)
	}
	// A digest the artifact does not have is refused before the tree is touched.
	bad := a
	bad.SHA256 = sha([]byte("other"))
	if _, err := s.Restage(context.Background(), bad); err == nil {
		t.Error("Restage accepted an artifact with the wrong digest")
	}
}
