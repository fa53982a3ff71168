// Package repo finds this repository's files from tests and builds its commands for them.
package repo

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// Path returns the absolute path of a file or folder of this repository.
func Path(rel string) (string, error) {
	_, self, _, _ := runtime.Caller(0)
	p := filepath.Join(filepath.Dir(self), "..", "..", rel)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("find %s in the repository: %w", rel, err)
	}
	return p, nil
}

// Build compiles commands of cmd/ (e.g. "gateway-launch", "manager") into dir, as static binaries.
func Build(dir string, commands ...string) error {
	root, err := Path(".")
	if err != nil {
		return err
	}
	for _, c := range commands {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, c), "./cmd/"+c)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("build %s: %v\n%s", c, err, out)
		}
	}
	return nil
}

// BuildTemp compiles commands of cmd/ into a new temporary folder, for a test package's
// TestMain, and returns the path of each (in order) and a function that removes them.
func BuildTemp(commands ...string) (paths []string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "gateway-bin-")
	if err != nil {
		return nil, nil, err
	}
	cleanup = func() { _ = os.RemoveAll(dir) }
	if err := Build(dir, commands...); err != nil {
		cleanup()
		return nil, nil, err
	}
	for _, c := range commands {
		paths = append(paths, filepath.Join(dir, c))
	}
	return paths, cleanup, nil
}
