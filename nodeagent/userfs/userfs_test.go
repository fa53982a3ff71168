package userfs_test

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/userfs"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" {
			t.Fatal("chown needs root, and GATEWAY_TEST_REQUIRE_ALL is set")
		}
		t.Skip("chown needs root")
	}
}

func stat(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

func mustWrite(t *testing.T, p string, uid, gid int) {
	t.Helper()
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(p, uid, gid); err != nil {
		t.Fatal(err)
	}
}

func open(t *testing.T, p string) *os.File {
	t.Helper()
	f, err := userfs.OpenDir(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// TestEnsureDirChangesOnlyWhatIsWrong: the folder is made with its mode and owner; a second
// call touches nothing (no inode change time moves anywhere in the tree); a changed mode is put
// back without walking the tree.
func TestEnsureDirChangesOnlyWhatIsWrong(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	parent := open(t, base)
	owner := userfs.Owner{UID: 64100, GID: 64100}
	if err := userfs.EnsureDir(parent, "home", 0o700, owner); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(base, "home")
	st := stat(t, home)
	if st.Uid != 64100 || st.Gid != 64100 || st.Mode&0o7777 != 0o700 {
		t.Fatalf("home: uid %d gid %d mode %o", st.Uid, st.Gid, st.Mode&0o7777)
	}
	mustWrite(t, filepath.Join(home, "state"), 64100, 64100)
	before := stat(t, filepath.Join(home, "state")).Ctim
	homeBefore := stat(t, home).Ctim
	if err := userfs.EnsureDir(parent, "home", 0o700, owner); err != nil {
		t.Fatal(err)
	}
	if stat(t, filepath.Join(home, "state")).Ctim != before || stat(t, home).Ctim != homeBefore {
		t.Error("a second EnsureDir changed what was already right")
	}
	if err := os.Chmod(home, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := userfs.EnsureDir(parent, "home", 0o700, owner); err != nil {
		t.Fatal(err)
	}
	if m := stat(t, home).Mode & 0o7777; m != 0o700 {
		t.Errorf("mode %o not put back to 0700", m)
	}
	if stat(t, filepath.Join(home, "state")).Ctim != before {
		t.Error("fixing the mode walked the tree")
	}
}

// TestEnsureDirRefusesSymlink: a symlink where the folder should be is an error; its target is
// not touched.
func TestEnsureDirRefusesSymlink(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	canary := filepath.Join(t.TempDir(), "canary")
	if err := os.Mkdir(canary, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(canary, filepath.Join(base, "home")); err != nil {
		t.Fatal(err)
	}
	if err := userfs.EnsureDir(open(t, base), "home", 0o700, userfs.Owner{UID: 64100, GID: 64100}); err == nil {
		t.Fatal("EnsureDir accepted a symlink")
	}
	if st := stat(t, canary); st.Uid != 0 || st.Mode&0o7777 != 0o755 {
		t.Fatalf("the symlink's target changed: uid %d mode %o", st.Uid, st.Mode&0o7777)
	}
}

// TestReownTouchesOnlyThePreviousOwnersEntries: on a change of owner, what the previous owner
// had is handed over; symlinks are re-owned themselves and never followed; a hard link to a
// file outside and another user's file keep their owners.
func TestReownTouchesOnlyThePreviousOwnersEntries(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	outside := t.TempDir()
	canary := filepath.Join(outside, "canary")
	mustWrite(t, canary, 0, 0)
	hardTarget := filepath.Join(base, "shadow") // same filesystem, so a hard link works
	mustWrite(t, hardTarget, 0, 0)
	parent := open(t, base)
	old, next := userfs.Owner{UID: 64100, GID: 64100}, userfs.Owner{UID: 64200, GID: 64200}
	if err := userfs.EnsureDir(parent, "home", 0o700, old); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(base, "home")
	if err := os.MkdirAll(filepath.Join(home, "a", "b"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"a", "a/b"} {
		if err := os.Lchown(filepath.Join(home, d), old.UID, old.GID); err != nil {
			t.Fatal(err)
		}
	}
	mustWrite(t, filepath.Join(home, "a", "b", "file"), old.UID, old.GID)
	mustWrite(t, filepath.Join(home, "theirs"), 64300, 64300)
	if err := os.Symlink(canary, filepath.Join(home, "a", "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(filepath.Join(home, "a", "link"), old.UID, old.GID); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(hardTarget, filepath.Join(home, "hard")); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(filepath.Join(home, "hard"), old.UID, old.GID); err != nil { // the link and its target are one inode
		t.Fatal(err)
	}

	if err := userfs.EnsureDir(parent, "home", 0o700, next); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"", "a", "a/b", "a/b/file", "a/link"} {
		if st := stat(t, filepath.Join(home, p)); int(st.Uid) != next.UID {
			t.Errorf("home/%s: uid %d, want %d", p, st.Uid, next.UID)
		}
	}
	if st := stat(t, canary); st.Uid != 0 {
		t.Errorf("the symlink's target outside home was re-owned to %d", st.Uid)
	}
	if st := stat(t, filepath.Join(home, "hard")); int(st.Uid) != old.UID {
		t.Errorf("a hard-linked file was re-owned to %d", st.Uid)
	}
	if st := stat(t, filepath.Join(home, "theirs")); st.Uid != 64300 {
		t.Errorf("another user's file was re-owned to %d", st.Uid)
	}
}

// TestReownSurvivesSymlinkSwapRace: while the agent re-owns a home over and over, the home's
// user swaps a subfolder and a symlink to a root-owned folder outside (renameat2 with
// RENAME_EXCHANGE) as fast as it can. Root's folder and the file in it never change hands.
func TestReownSurvivesSymlinkSwapRace(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	canaryDir := filepath.Join(t.TempDir(), "etc")
	if err := os.Mkdir(canaryDir, 0o755); err != nil {
		t.Fatal(err)
	}
	canary := filepath.Join(canaryDir, "shadow")
	mustWrite(t, canary, 0, 0)
	parent := open(t, base)
	owners := []userfs.Owner{{UID: 64100, GID: 64100}, {UID: 64200, GID: 64200}}
	if err := userfs.EnsureDir(parent, "home", 0o700, owners[0]); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(base, "home")
	sub := filepath.Join(home, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(sub, "shadow"), owners[0].UID, owners[0].GID)
	if err := os.Lchown(sub, owners[0].UID, owners[0].GID); err != nil {
		t.Fatal(err)
	}
	swap := filepath.Join(home, "swap")
	if err := os.Symlink(canaryDir, swap); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var swaps atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if err := unix.Renameat2(unix.AT_FDCWD, sub, unix.AT_FDCWD, swap, unix.RENAME_EXCHANGE); err == nil {
				swaps.Add(1)
			}
		}
	}()
	const rounds = 3000
	for i := range rounds {
		// Alternate owners so every round re-owns the whole tree.
		if err := userfs.EnsureDir(parent, "home", 0o700, owners[(i+1)%2]); err != nil {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("round %d: %v", i, err)
		}
		if st := stat(t, canaryDir); st.Uid != 0 {
			break
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d rounds, %d swaps", rounds, swaps.Load())
	for _, p := range []string{canaryDir, canary} {
		if st := stat(t, p); st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s was taken over: uid %d gid %d", p, st.Uid, st.Gid)
		}
	}
}

// TestOpenBeneathRefusesSymlinks: a path below a trusted folder resolves only through real
// folders.
func TestOpenBeneathRefusesSymlinks(t *testing.T) {
	base := t.TempDir()
	if err := os.MkdirAll(filepath.Join(base, "home", "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "home", "run", "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	root := open(t, base)
	f, err := userfs.OpenBeneath(root, "home/run/f")
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if err := os.Symlink("/etc", filepath.Join(base, "home", "etc")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("run", filepath.Join(base, "home", "run2")); err != nil {
		t.Fatal(err)
	}
	for _, rel := range []string{"home/etc/passwd", "home/run2/f", "../" + filepath.Base(base) + "/home/run/f", "/etc/passwd"} {
		if f, err := userfs.OpenBeneath(root, rel); err == nil {
			_ = f.Close()
			t.Errorf("OpenBeneath(%q) succeeded", rel)
		}
	}
}
