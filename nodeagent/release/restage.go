package release

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Restage stages a release again over a tree that changed on the host: it fetches the artifact
// again (its sha256 is checked before anything is unpacked), unpacks it into a fresh temporary
// folder, swaps that folder with the staged one in one rename (renameat2 RENAME_EXCHANGE, so a
// gateway resolving a path through `current` finds one whole tree or the other) and removes the
// old tree. Ensure's rules hold: a *RejectedError means the artifact is bad.
func (s *Store) Restage(ctx context.Context, a Artifact) (string, error) {
	u, err := validate(a)
	if err != nil {
		return "", err
	}
	var rel string
	if u.Scheme == "file" {
		if rel, err = s.fileRel(u); err != nil {
			return "", err
		}
	}
	final := s.Path(a)
	if fi, err := os.Lstat(final); err != nil || !fi.IsDir() {
		// Nothing staged to swap with (or not a folder): stage it the ordinary way.
		return s.Ensure(ctx, a)
	}
	if err := s.private(); err != nil {
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	tmp, err := s.unpackBeside(ctx, a, u, rel, final)
	if err != nil {
		return "", err
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE); err != nil {
		_ = removeTree(tmp)
		return "", fmt.Errorf("release %s: swapping in the new tree: %w", a.Label, err)
	}
	// tmp now holds the changed tree; a leftover is removed by the next Ensure or GC.
	if err := removeTree(tmp); err != nil {
		return "", fmt.Errorf("release %s: removing the changed tree: %w", a.Label, err)
	}
	if err := syncPath(s.Dir); err != nil {
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	return final, nil
}

// TreeDigest is a sha256 over a staged tree: every entry's path, type and permission bits, and
// a file's content or a link's target, in lexical order. Links are never followed. Two digests
// of one tree differ exactly when something in it changed.
func TreeDigest(dir string) (string, error) {
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(h, "%s\x00%s\x00", strconv.Quote(rel), fi.Mode().String())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "%s\x00", strconv.Quote(t))
		case fi.Mode().IsRegular():
			f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0) //nolint:gosec // a root-owned tree the store staged
			if err != nil {
				return err
			}
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "\x00")
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}
