package userfs_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/userfs"
)

const userUID, userGID = 4321, 4321

// home makes a folder owned by the test's user inside a root-owned one, as a profile's home.
func home(t *testing.T) (string, *os.File) {
	t.Helper()
	needRoot(t)
	h := filepath.Join(t.TempDir(), "home")
	if err := os.Mkdir(h, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(h, userUID, userGID); err != nil {
		t.Fatal(err)
	}
	return h, open(t, h)
}

// TestWriteFileOwnerModeAndFolders: the file and the folders made on its way are the user's,
// with the mode asked for; writing the same again changes nothing.
func TestWriteFileOwnerModeAndFolders(t *testing.T) {
	h, dir := home(t)
	owner := userfs.Owner{UID: userUID, GID: userGID}
	wrote, err := userfs.WriteFile(dir, "config/app/key.pem", []byte("secret"), 0o400, owner)
	if err != nil || !wrote {
		t.Fatalf("WriteFile = %v, %v", wrote, err)
	}
	p := filepath.Join(h, "config/app/key.pem")
	if st := stat(t, p); st.Uid != userUID || st.Gid != userGID || st.Mode&0o7777 != 0o400 {
		t.Errorf("file: uid %d gid %d mode %o", st.Uid, st.Gid, st.Mode&0o7777)
	}
	for _, d := range []string{"config", "config/app"} {
		if st := stat(t, filepath.Join(h, d)); st.Uid != userUID || st.Mode&0o777 != 0o700 {
			t.Errorf("%s: uid %d mode %o", d, st.Uid, st.Mode&0o777)
		}
	}
	before := stat(t, p).Ino
	if wrote, err := userfs.WriteFile(dir, "config/app/key.pem", []byte("secret"), 0o400, owner); err != nil || wrote {
		t.Errorf("second WriteFile = %v, %v; want nothing written", wrote, err)
	}
	if stat(t, p).Ino != before {
		t.Error("an unchanged file was replaced")
	}
	if wrote, err := userfs.WriteFile(dir, "config/app/key.pem", []byte("rotated"), 0o400, owner); err != nil || !wrote {
		t.Errorf("rotated WriteFile = %v, %v", wrote, err)
	}
	if b, _ := os.ReadFile(p); string(b) != "rotated" {
		t.Errorf("content %q", b)
	}
	entries, _ := os.ReadDir(filepath.Join(h, "config/app"))
	if len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
}

// TestWriteFileNeverFollowsALink: a symlink the user planted at the file is replaced, not
// written through; a symlinked folder on the way is refused; a hard link to an outside file is
// replaced, and the outside file is left as it was.
func TestWriteFileNeverFollowsALink(t *testing.T) {
	h, dir := home(t)
	owner := userfs.Owner{UID: userUID, GID: userGID}
	outside := filepath.Join(t.TempDir(), "shadow")
	if err := os.WriteFile(outside, []byte("root's"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(h, ".env")); err != nil {
		t.Fatal(err)
	}
	if _, err := userfs.WriteFile(dir, ".env", []byte("secret"), 0o600, owner); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Lstat(filepath.Join(h, ".env")); fi.Mode()&os.ModeSymlink != 0 {
		t.Error(".env is still a symlink")
	}
	if err := os.Link(outside, filepath.Join(h, "linked")); err != nil {
		t.Fatal(err)
	}
	if _, err := userfs.WriteFile(dir, "linked", []byte("secret"), 0o600, owner); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Dir(outside), filepath.Join(h, "config")); err != nil {
		t.Fatal(err)
	}
	if _, err := userfs.WriteFile(dir, "config/x", []byte("secret"), 0o600, owner); err == nil {
		t.Error("wrote through a symlinked folder")
	}
	if err := userfs.Remove(dir, "config/shadow"); err == nil {
		t.Error("removed through a symlinked folder")
	}
	if b, err := os.ReadFile(outside); err != nil || string(b) != "root's" {
		t.Errorf("the outside file changed: %q %v", b, err)
	}
	if st := stat(t, outside); st.Uid != 0 || st.Mode&0o777 != 0o600 {
		t.Errorf("the outside file changed hands: uid %d mode %o", st.Uid, st.Mode&0o777)
	}
	if err := userfs.Remove(dir, ".env"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(h, ".env")); !os.IsNotExist(err) {
		t.Errorf(".env still there: %v", err)
	}
	if err := userfs.Remove(dir, "gone/file"); err != nil {
		t.Errorf("removing a missing file: %v", err)
	}
}

// TestWriteFileRefusesAnotherUsersFolder: a folder on the way that is not the user's (say
// root's, made by someone else) is not written into.
func TestWriteFileRefusesAnotherUsersFolder(t *testing.T) {
	h, dir := home(t)
	if err := os.Mkdir(filepath.Join(h, "rootdir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := userfs.WriteFile(dir, "rootdir/x", []byte("s"), 0o600, userfs.Owner{UID: userUID, GID: userGID}); err == nil {
		t.Error("wrote into a folder that is not the user's")
	}
	if _, err := userfs.WriteFile(dir, "../x", []byte("s"), 0o600, userfs.Owner{UID: userUID, GID: userGID}); err == nil {
		t.Error("wrote outside home")
	}
}
