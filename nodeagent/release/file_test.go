package release

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ensureBounded runs Ensure and fails the test if it has not returned within a generous bound:
// the cases here used to block the agent forever. unblock, if set, runs when the bound is hit so
// the stuck call can end before the test does.
func ensureBounded(t *testing.T, st *Store, a Artifact, unblock func()) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := st.Ensure(context.Background(), a)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		if unblock != nil {
			unblock()
		}
		err := <-done
		t.Fatalf("Ensure of %s did not return within 20s (then: %v)", a.URL, err)
		return nil
	}
}

// openFifoWriter releases a reader blocked opening the fifo at p.
func openFifoWriter(p string) func() {
	return func() {
		fd, err := unix.Open(p, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			_ = unix.Close(fd)
		}
	}
}

func TestEnsureFileInsideRoot(t *testing.T) {
	data := tgz(t, reg("f", "x"))
	st, base := newStore(t)
	sub := filepath.Join(base, "drop", "sub")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	st.FileRoot = filepath.Join(base, "drop")
	good := writeArtifact(t, sub, data)

	// A good file in a subfolder, also when the URL wanders inside the folder first.
	wander := "file://" + filepath.Join(st.FileRoot, "sub/../sub/./artifact.tar.gz")
	for i, u := range []string{good, wander} {
		a := Artifact{URL: u, SHA256: sha(data), Label: "1.0." + strconv.Itoa(i)}
		if _, err := st.Ensure(context.Background(), a); err != nil {
			t.Fatalf("Ensure %s: %v", u, err)
		}
	}

	fifo := filepath.Join(sub, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	zero := filepath.Join(sub, "zero") // like /dev/zero: opens fine, never ends
	if err := unix.Mknod(zero, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 5))); err != nil {
		t.Fatal(err)
	}
	// Symlinks are refused wherever they are, even when they stay inside.
	if err := os.Symlink(filepath.Join(base, "artifact.tar.gz"), filepath.Join(sub, "out")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("artifact.tar.gz", filepath.Join(sub, "in")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(base, filepath.Join(st.FileRoot, "outdir")); err != nil {
		t.Fatal(err)
	}
	writeArtifact(t, base, data) // what the links point at, outside the folder

	for i, c := range []struct {
		name, path, reason, says string
		unblock                  func()
	}{
		{"fifo", fifo, ReasonBadArtifact, "not a regular file", openFifoWriter(fifo)},
		{"char device", zero, ReasonBadArtifact, "not a regular file", nil},
		{"folder", sub, ReasonBadArtifact, "not a regular file", nil},
		{"symlink out", filepath.Join(sub, "out"), ReasonBadArtifact, "symlink", nil},
		{"symlink inside", filepath.Join(sub, "in"), ReasonBadArtifact, "symlink", nil},
		{"through a folder symlink", filepath.Join(st.FileRoot, "outdir/artifact.tar.gz"), ReasonBadArtifact, "symlink", nil},
		{"missing", filepath.Join(sub, "nope.tar.gz"), ReasonNotFound, "does not exist", nil},
		{"under a file", filepath.Join(sub, "artifact.tar.gz/x"), ReasonNotFound, "does not exist", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A label of its own, so an earlier case that wrongly staged the file cannot hide this one.
			a := Artifact{URL: "file://" + c.path, SHA256: sha(data), Label: "2.0." + strconv.Itoa(i)}
			err := ensureBounded(t, st, a, c.unblock)
			rej, ok := asRejected(err)
			if !ok || rej.Reason != c.reason || !strings.Contains(rej.Message, c.says) {
				t.Fatalf("Ensure: %v; want %s saying %q", err, c.reason, c.says)
			}
			assertNoLeftovers(t, st, filepath.Base(st.Path(Artifact{SHA256: sha(data), Label: "1.0.0"})), filepath.Base(st.Path(Artifact{SHA256: sha(data), Label: "1.0.1"})))
		})
	}
}

func TestEnsureFileOutsideRootRevealsNothing(t *testing.T) {
	st, base := newStore(t)
	st.FileRoot = filepath.Join(base, "drop")
	if err := os.Mkdir(st.FileRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	secretData := []byte("root's secret, 38 bytes long, or so...")
	secret := filepath.Join(base, "secret")
	if err := os.WriteFile(secret, secretData, 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(base, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	want := "BadArtifact: file URLs must name a file under " + st.FileRoot
	for _, p := range []string{
		secret,
		filepath.Join(base, "missing"),
		fifo,
		"/dev/zero",
		"/proc/self/environ",
		st.FileRoot + "/../secret",
		st.FileRoot + "-sibling/secret",
		st.FileRoot,
		"/",
	} {
		t.Run(p, func(t *testing.T) {
			// The digest of the secret itself: a mismatch message would have shown it.
			a := Artifact{URL: "file://" + p, SHA256: sha([]byte("something else")), Label: testLabel}
			err := ensureBounded(t, st, a, openFifoWriter(fifo))
			if err == nil || err.Error() != want {
				t.Fatalf("Ensure: %v; want exactly %q", err, want)
			}
			// The exact match above already says it; these name what used to leak.
			for _, leak := range []string{sha(secretData), " bytes", "exist", "regular"} {
				if strings.Contains(err.Error(), leak) {
					t.Errorf("the error tells %q", leak)
				}
			}
			assertNoLeftovers(t, st)
		})
	}
}

func TestEnsureFileTurnedOff(t *testing.T) {
	data := tgz(t, reg("f", "x"))
	st, base := newStore(t)
	st.FileRoot = ""
	a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
	_, err := st.Ensure(context.Background(), a)
	if rej, ok := asRejected(err); !ok || rej.Reason != ReasonBadArtifact || !strings.Contains(rej.Message, "turned off") {
		t.Fatalf("Ensure: %v; want BadArtifact saying file URLs are off", err)
	}

	st.FileRoot = "relative/drop"
	if _, err := st.Ensure(context.Background(), a); err == nil || strings.Contains(err.Error(), base) {
		t.Fatalf("Ensure with a relative FileRoot: %v; want a configuration error", err)
	}
}
