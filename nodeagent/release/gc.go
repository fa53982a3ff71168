package release

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// GC removes staged releases beyond the newest keep (ranked by the folder's mtime, newest first;
// releases in use count towards keep) and never removes a release listed in inUse, nor Dir
// itself. It also removes stale "*.tmp" folders and ".download-*" files, so it must not run
// while an Ensure on the same Dir is in progress. Read-only trees are made writable first.
// Entries of Dir that are neither releases nor leftovers are left alone. It returns the removed
// paths; a failure to remove one path does not stop the others.
//
// inUse holds absolute paths, e.g. the resolved targets of every profile's `current` link. A
// release counts as in use when its folder name is any element of such a path, so host paths
// (/opt/agent/releases/<sha>-<label>), paths under the agent's root prefix and paths inside a
// release all protect it.
func (s *Store) GC(keep int, inUse []string) ([]string, error) {
	entries, err := os.ReadDir(s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("release GC: %w", err)
	}
	if err := s.private(); err != nil {
		return nil, fmt.Errorf("release GC: %w", err)
	}
	protected := make(map[string]bool)
	for _, p := range inUse {
		for _, elem := range strings.Split(filepath.ToSlash(filepath.Clean(p)), "/") {
			protected[elem] = true
		}
	}

	type staged struct {
		name  string
		mtime time.Time
	}
	var releases []staged
	var doomed []string
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasPrefix(name, downloadPrefix), strings.HasSuffix(name, tmpSuffix) && e.IsDir():
			doomed = append(doomed, name)
		case e.IsDir() && isReleaseName(name):
			info, err := e.Info()
			if err != nil {
				continue // vanished meanwhile
			}
			releases = append(releases, staged{name, info.ModTime()})
		}
	}
	// Releases in use take part in the ranking, they are only spared below.
	sort.Slice(releases, func(i, j int) bool {
		if !releases[i].mtime.Equal(releases[j].mtime) {
			return releases[i].mtime.After(releases[j].mtime)
		}
		return releases[i].name > releases[j].name
	})
	for i, r := range releases {
		if i >= max(keep, 0) {
			doomed = append(doomed, r.name)
		}
	}

	var removed []string
	var errs []error
	for _, name := range doomed {
		if protected[name] {
			continue
		}
		p := filepath.Join(s.Dir, name)
		if err := removeTree(p); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, p)
	}
	if len(errs) > 0 {
		return removed, fmt.Errorf("release GC: %w", errors.Join(errs...))
	}
	return removed, nil
}

// isReleaseName reports whether a folder name has the form <sha256>-<label> that Ensure gives
// staged releases.
func isReleaseName(name string) bool {
	sum, label, ok := strings.Cut(name, "-")
	return ok && v1.ValidateSHA256(sum) == nil && v1.ValidateReleaseLabel(label) == nil &&
		!strings.HasSuffix(label, tmpSuffix)
}
