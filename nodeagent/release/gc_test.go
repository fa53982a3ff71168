package release

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// stageFake makes a read-only release folder with the given mtime, as Ensure would leave it.
func stageFake(t *testing.T, dir, name string, mtime time.Time) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Join(p, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, "bin/run"), []byte("run"), 0o555); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Join(p, "bin"), p} {
		if err := os.Chmod(d, 0o555); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chtimes(p, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	return p
}

func releaseName(i int, label string) string {
	return strings.Repeat(string(rune('a'+i)), 64) + "-" + label
}

func TestGC(t *testing.T) {
	st, _ := newStore(t)
	if err := os.MkdirAll(st.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var rel []string // oldest first
	for i := range 6 {
		rel = append(rel, stageFake(t, st.Dir, releaseName(i, "1.0."+string(rune('0'+i))), t0.Add(time.Duration(i)*time.Hour)))
	}

	staleTmp := filepath.Join(st.Dir, releaseName(0, "2.0.0")+".tmp")
	if err := os.MkdirAll(filepath.Join(staleTmp, "half"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(staleTmp, 0o555); err != nil {
		t.Fatal(err)
	}
	staleDownload := filepath.Join(st.Dir, ".download-abc")
	if err := os.WriteFile(staleDownload, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	// Things GC does not own.
	for _, f := range []string{"notes.txt", "weird.tmp"} {
		if err := os.WriteFile(filepath.Join(st.Dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(st.Dir, "lost+found"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(rel[0], filepath.Join(st.Dir, "latest")); err != nil {
		t.Fatal(err)
	}

	inUse := []string{
		rel[0], // the oldest, by its path under the root prefix
		// by its path inside the host, as a profile's current link names it
		"/opt/agent/releases/" + filepath.Base(rel[2]),
		// a path inside a release protects it too
		filepath.Join(rel[1], "bin/run"),
	}
	removed, err := st.GC(2, inUse)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	want := []string{staleDownload, rel[3], staleTmp}
	slices.Sort(want)
	if !slices.Equal(removed, want) {
		t.Errorf("GC removed %v; want %v", removed, want)
	}
	wantLeft := []string{"latest", "lost+found", "notes.txt", "weird.tmp"}
	for _, i := range []int{0, 1, 2, 4, 5} {
		wantLeft = append(wantLeft, filepath.Base(rel[i]))
		if _, err := os.Stat(filepath.Join(rel[i], "bin/run")); err != nil {
			t.Errorf("kept release %d is damaged: %v", i, err)
		}
	}
	assertNoLeftovers(t, st, wantLeft...)

	// Nothing in use, keep nothing: every release goes, the folder itself stays.
	removed, err = st.GC(0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 5 {
		t.Errorf("GC(0) removed %v; want the 5 releases", removed)
	}
	assertNoLeftovers(t, st, "latest", "lost+found", "notes.txt", "weird.tmp")
}

// TestGCKeepCountsReleasesInUse pins down that releases in use take keep slots.
func TestGCKeepCountsReleasesInUse(t *testing.T) {
	st, _ := newStore(t)
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	old := stageFake(t, st.Dir, releaseName(0, "1"), t0)
	mid := stageFake(t, st.Dir, releaseName(1, "2"), t0.Add(time.Hour))
	newest := stageFake(t, st.Dir, releaseName(2, "3"), t0.Add(2*time.Hour))
	removed, err := st.GC(1, []string{newest})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	if want := []string{old, mid}; !slices.Equal(removed, want) {
		t.Errorf("GC removed %v; want %v", removed, want)
	}
	if removed, err := st.GC(-1, []string{newest}); err != nil || len(removed) != 0 {
		t.Errorf("GC(-1) removed %v, %v; want nothing (the one left is in use)", removed, err)
	}
}

func TestGCMissingDir(t *testing.T) {
	st, _ := newStore(t)
	removed, err := st.GC(0, nil)
	if err != nil || len(removed) != 0 {
		t.Errorf("GC on a missing folder: %v, %v", removed, err)
	}
}

// TestGCRemovesEnsuredRelease runs GC over a tree Ensure made read-only.
func TestGCRemovesEnsuredRelease(t *testing.T) {
	data := tgz(t, validEntries()...)
	st, base := newStore(t)
	p, err := st.Ensure(context.Background(), Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel})
	if err != nil {
		t.Fatal(err)
	}
	removed, err := st.GC(0, nil)
	if err != nil || !slices.Equal(removed, []string{p}) {
		t.Fatalf("GC removed %v, %v; want %s", removed, err, p)
	}
	assertNoLeftovers(t, st)
}
