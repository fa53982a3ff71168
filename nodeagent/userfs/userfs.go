// Package userfs is what the root agent does inside folders a profile's user can write (its
// home and logs): make them, give them to their user, and reach what is in them. The user runs
// hostile code and may swap any entry for a symlink or a hard link at any moment, so every
// operation here works on file descriptors, opens each path component with O_NOFOLLOW, and acts
// on the object it opened (fchown/fchmod on the fd), never on a path that could be re-resolved.
// Nothing is changed that is already right, so a steady-state apply walks nothing.
package userfs

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Owner is a user and group id.
type Owner struct{ UID, GID int }

// OpenDir opens a folder the agent trusts (all of its components are root-owned, such as
// /opt/agent/gateways/<profile>) as an O_PATH handle that later calls work relative to. The
// last component must not be a symlink.
func OpenDir(path string) (*os.File, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// EnsureDir makes the folder name inside parent (an fd from OpenDir) with mode and owner,
// fixing mode and owner when they differ. When the folder changes hands (a profile switched
// between isolation modes), what the previous owner had inside it is given to the new owner as
// well, fd-relative (see Reown). A symlink or anything but a folder at name is an error.
func EnsureDir(parent *os.File, name string, mode os.FileMode, to Owner) error {
	if err := checkName(name); err != nil {
		return err
	}
	err := unix.Mkdirat(int(parent.Fd()), name, uint32(mode.Perm()))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("mkdir %s/%s: %w", parent.Name(), name, err)
	}
	dir, err := openChildDir(parent, name)
	if err != nil {
		return err
	}
	defer dir.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
		return fmt.Errorf("stat %s: %w", dir.Name(), err)
	}
	if int(st.Uid) != to.UID || int(st.Gid) != to.GID {
		from := Owner{UID: int(st.Uid), GID: int(st.Gid)}
		if err := unix.Fchown(int(dir.Fd()), to.UID, to.GID); err != nil {
			return fmt.Errorf("chown %s: %w", dir.Name(), err)
		}
		if err := Reown(dir, from, to); err != nil {
			return err
		}
	}
	if os.FileMode(st.Mode).Perm() != mode.Perm() || st.Mode&(unix.S_ISUID|unix.S_ISGID|unix.S_ISVTX) != 0 {
		if err := unix.Fchmod(int(dir.Fd()), uint32(mode.Perm())); err != nil {
			return fmt.Errorf("chmod %s: %w", dir.Name(), err)
		}
	}
	return nil
}

// Reown gives every entry below dir (an open folder) that belongs to from to the owner to. It
// never follows a symlink (a symlink itself is re-owned, its target is not), descends only into
// folders it opened with O_NOFOLLOW, and leaves alone entries of anyone else and regular files
// with more than one link (a hard link to a file outside the tree must not change hands).
func Reown(dir *os.File, from, to Owner) error {
	names, err := readNames(dir)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := reownEntry(dir, name, from, to); err != nil {
			return err
		}
	}
	return nil
}

func reownEntry(dir *os.File, name string, from, to Owner) error {
	// An O_PATH handle of the entry itself (a symlink stays a symlink): what is checked is
	// what is changed, whatever the user renames meanwhile.
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil // removed meanwhile
	}
	if err != nil {
		return fmt.Errorf("open %s/%s: %w", dir.Name(), name, err)
	}
	h := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), name))
	defer h.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", h.Name(), err)
	}
	if int(st.Uid) != from.UID {
		return nil
	}
	typ := st.Mode & unix.S_IFMT
	if typ == unix.S_IFREG && st.Nlink > 1 {
		return nil
	}
	gid := to.GID
	if int(st.Gid) != from.GID {
		gid = -1 // keep a group the entry was given on purpose
	}
	if err := unix.Fchownat(fd, "", to.UID, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("chown %s: %w", h.Name(), err)
	}
	if typ != unix.S_IFDIR {
		return nil
	}
	sub, err := openChildDir(dir, name)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENOENT) {
			return nil // swapped for something else meanwhile: not ours to follow
		}
		return err
	}
	defer sub.Close()
	// The folder opened must be the one checked above, or a swap happened in between.
	var st2 unix.Stat_t
	if err := unix.Fstat(int(sub.Fd()), &st2); err != nil {
		return fmt.Errorf("stat %s: %w", sub.Name(), err)
	}
	if st2.Dev != st.Dev || st2.Ino != st.Ino {
		return nil
	}
	return Reown(sub, from, to)
}

// openChildDir opens the folder name inside parent for reading, refusing a symlink.
func openChildDir(parent *os.File, name string) (*os.File, error) {
	fd, err := unix.Openat(int(parent.Fd()), name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: filepath.Join(parent.Name(), name), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(parent.Name(), name)), nil
}

// readNames lists a folder opened for reading.
func readNames(dir *os.File) ([]string, error) {
	// A fresh fd of the same folder: Readdirnames keeps its position in the file.
	fd, err := unix.Openat(int(dir.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dir.Name(), err)
	}
	f := os.NewFile(uintptr(fd), dir.Name())
	defer f.Close()
	return f.Readdirnames(-1)
}

// OpenBeneath opens rel (a relative path such as "run/status.sock") beneath the trusted folder
// root as an O_PATH handle, refusing symlinks in every component and any escape from root. The
// handle can be used as "/proc/self/fd/<n>" (to connect to a socket, say) without the path
// being resolved again.
func OpenBeneath(root *os.File, rel string) (*os.File, error) {
	fd, err := unix.Openat2(int(root.Fd()), rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC | unix.O_NOFOLLOW,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: filepath.Join(root.Name(), rel), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(root.Name(), rel)), nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("%q is not a plain file name", name)
	}
	return nil
}

// WriteFile puts data at rel (a relative path such as "config/app.yaml") beneath home, the
// user's folder opened with OpenDir, owned by to with mode. Missing folders on the way are
// made (0700, the user's); every component is opened with O_NOFOLLOW and must be a folder the
// user owns. The file is written to a new temporary file in its folder, given its owner and
// mode before any data, synced and renamed over rel: the user never sees it half written, and
// whatever the user left at rel (a symlink, a hard link) is replaced, never written through.
// A file already holding data with owner and mode is left alone; it reports whether it wrote.
func WriteFile(home *os.File, rel string, data []byte, mode os.FileMode, to Owner) (bool, error) {
	dir, name, err := walkParent(home, rel, to, true)
	if err != nil {
		return false, err
	}
	defer dir.Close()
	if same(dir, name, data, mode, to) {
		return false, nil
	}
	// A name the user cannot guess, so it cannot plant anything there first.
	tmp := ".agent-write-" + rand.Text()
	fd, err := unix.Openat(int(dir.Fd()), tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return false, fmt.Errorf("create %s/%s: %w", dir.Name(), tmp, err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(dir.Name(), tmp))
	werr := errors.Join(unix.Fchown(fd, to.UID, to.GID), unix.Fchmod(fd, uint32(mode.Perm())))
	if werr == nil {
		_, werr = f.Write(data)
	}
	if werr == nil {
		werr = f.Sync()
	}
	werr = errors.Join(werr, f.Close())
	if werr == nil {
		werr = unix.Renameat(int(dir.Fd()), tmp, int(dir.Fd()), name)
	}
	if werr != nil {
		_ = unix.Unlinkat(int(dir.Fd()), tmp, 0)
		return false, fmt.Errorf("write %s/%s: %w", dir.Name(), name, werr)
	}
	return true, unix.Fsync(int(dir.Fd()))
}

// Remove deletes the file rel beneath home, if there is one, without following a symlink on
// the way; a folder at rel is left alone.
func Remove(home *os.File, rel string) error {
	dir, name, err := walkParent(home, rel, Owner{}, false)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := unix.Unlinkat(int(dir.Fd()), name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s/%s: %w", dir.Name(), name, err)
	}
	return nil
}

// walkParent opens the folder that holds rel's last component, one O_NOFOLLOW step at a time
// from home, making missing folders when create is set. A folder on the way must be the user's
// (when create is set) and a real folder; the name of the last component is returned with it.
func walkParent(home *os.File, rel string, to Owner, create bool) (*os.File, string, error) {
	parts := strings.Split(rel, "/")
	for _, p := range parts {
		if err := checkName(p); err != nil {
			return nil, "", fmt.Errorf("path %q: %w", rel, err)
		}
	}
	dir, err := openChildDir(home, ".")
	if err != nil {
		return nil, "", err
	}
	for _, p := range parts[:len(parts)-1] {
		if create {
			err := unix.Mkdirat(int(dir.Fd()), p, 0o700)
			if err == nil {
				// Made by root: hand it to the user before anything goes in.
				sub, err := openChildDir(dir, p)
				if err != nil {
					dir.Close()
					return nil, "", err
				}
				err = unix.Fchown(int(sub.Fd()), to.UID, to.GID)
				sub.Close()
				if err != nil {
					dir.Close()
					return nil, "", fmt.Errorf("chown %s/%s: %w", dir.Name(), p, err)
				}
			} else if !errors.Is(err, unix.EEXIST) {
				dir.Close()
				return nil, "", fmt.Errorf("mkdir %s/%s: %w", dir.Name(), p, err)
			}
		}
		sub, err := openChildDir(dir, p)
		dir.Close()
		if err != nil {
			return nil, "", err
		}
		dir = sub
		if create {
			var st unix.Stat_t
			if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
				dir.Close()
				return nil, "", err
			}
			if int(st.Uid) != to.UID {
				dir.Close()
				return nil, "", fmt.Errorf("%s belongs to uid %d, not the profile's user", dir.Name(), st.Uid)
			}
		}
	}
	return dir, parts[len(parts)-1], nil
}

// same reports whether name in dir is a regular file of its own (one link) holding exactly
// data with owner and mode. It reads no more than len(data)+1 bytes and never blocks on a fifo.
func same(dir *os.File, name string, data []byte, mode os.FileMode, to Owner) bool {
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 ||
		int(st.Uid) != to.UID || int(st.Gid) != to.GID || os.FileMode(st.Mode).Perm() != mode.Perm() ||
		st.Mode&(unix.S_ISUID|unix.S_ISGID|unix.S_ISVTX) != 0 || st.Size != int64(len(data)) {
		return false
	}
	got := make([]byte, len(data)+1)
	n, _ := io.ReadFull(f, got)
	return n == len(data) && bytes.Equal(got[:n], data)
}
