package release

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// fuzzLimits keep each fuzz run small; the limits themselves are tested elsewhere.
var fuzzLimits = Limits{MaxDownloadBytes: 1 << 20, MaxUnpackedBytes: 1 << 20, MaxEntries: 256}

// FuzzExtract feeds arbitrary bytes to Extract.
func FuzzExtract(f *testing.F) {
	f.Add(tgz(f, validEntries()...))
	f.Add(tgz(f))
	f.Add([]byte{})
	for _, c := range hostileCases(f) {
		f.Add(c.archive(f))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		extractAndCheck(t, data)
	})
}

// FuzzTarStream gzips its input first, so the fuzzer can work on tar headers directly instead
// of on compressed bytes.
func FuzzTarStream(f *testing.F) {
	f.Add(rawTar(f, validEntries()...))
	f.Add(nulNameTar(f))
	f.Add(headerFlood(f, 100, false))
	f.Add(headerFlood(f, 100, true))
	for _, c := range hostileCases(f) {
		if c.raw == nil {
			f.Add(rawTar(f, c.ents...))
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		extractAndCheck(t, gz(t, data))
	})
}

// extractAndCheck unpacks data next to a canary folder and asserts the safety properties: nothing
// outside dest changes, whatever the outcome; an in-memory archive fails only with a
// RejectedError; and a successful extraction leaves a read-only tree of plain files, folders
// and in-tree symlinks.
func extractAndCheck(t *testing.T, data []byte) {
	base := tempDir(t)
	dest := filepath.Join(base, "dest")
	outside := filepath.Join(base, "outside")
	for _, d := range []string{dest, outside} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	canary := filepath.Join(outside, "canary")
	if err := os.WriteFile(canary, []byte("canary"), 0o644); err != nil {
		t.Fatal(err)
	}

	err := Extract(bytes.NewReader(data), dest, fuzzLimits)
	if err != nil {
		if _, ok := asRejected(err); !ok {
			t.Fatalf("an in-memory archive failed with an error that is not a RejectedError (would be retried forever): %v", err)
		}
	}
	if got := listDir(t, base); !slices.Equal(got, []string{"dest", "outside"}) {
		t.Fatalf("the folder around dest now holds %v", got)
	}
	if got := listDir(t, outside); !slices.Equal(got, []string{"canary"}) {
		t.Fatalf("the canary folder now holds %v", got)
	}
	if b, rerr := os.ReadFile(canary); rerr != nil || string(b) != "canary" {
		t.Fatalf("canary: %q, %v", b, rerr)
	}
	if err == nil {
		checkSafeTree(t, dest)
	}
}

// checkSafeTree walks a tree without following symlinks and reports anything unsafe in it.
func checkSafeTree(t *testing.T, dest string) {
	t.Helper()
	realDest, err := filepath.EvalSymlinks(dest)
	if err != nil {
		t.Fatal(err)
	}
	err = filepath.WalkDir(dest, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if !within(dest, p) {
			t.Errorf("%s is outside %s", p, dest)
		}
		m := fi.Mode()
		if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
			t.Errorf("%s has mode %v", p, m)
		}
		switch {
		case m.IsDir():
			if m.Perm() != 0o555 || m&fs.ModeSticky != 0 {
				t.Errorf("folder %s has mode %v; want dr-xr-xr-x", p, m)
			}
		case m.IsRegular():
			if m.Perm() != 0o444 && m.Perm() != 0o555 {
				t.Errorf("file %s has mode %v; want 0444 or 0555", p, m)
			}
		case m&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if filepath.IsAbs(target) || !within(dest, filepath.Join(filepath.Dir(p), target)) {
				t.Errorf("symlink %s -> %q points outside %s", p, target, dest)
			}
			// A dangling link cannot be resolved; one that resolves must stay inside.
			if r, err := filepath.EvalSymlinks(p); err == nil && !within(realDest, r) {
				t.Errorf("symlink %s -> %q resolves to %s, outside %s", p, target, r, realDest)
			}
		default:
			t.Errorf("%s has type %v; only files, folders and symlinks may be unpacked", p, m.Type())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func within(root, p string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && (rel == "." || filepath.IsLocal(rel))
}
