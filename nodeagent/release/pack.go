package release

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// PackTime is the modification time of every entry Pack writes. A fixed time makes two packs of
// the same tree byte-identical; it is not zero because some tools treat the epoch as "unknown".
var PackTime = time.Date(2000, time.January, 1, 0, 0, 0, 0, time.UTC)

// CLIEntrypoint is the module a release must hold for profiles in cli mode:
// `python -m agent_cli.main` runs it (see docs/runtime-contract.md).
const CLIEntrypoint = "agent_cli/main.py"

// Packed is a release tarball built by Pack.
type Packed struct {
	Data   []byte
	SHA256 string
	// Entries is the number of tar entries, folders included.
	Entries int
	// CLI tells whether the tree holds CLIEntrypoint, so profiles in cli mode can run it.
	CLI bool
}

// Pack builds a release tarball of the folder dir: entries in lexical order, every time
// PackTime, owner root:root (0:0), folders 0755, files 0755 when any exec bit is set and 0644
// otherwise, symlinks as they are. It refuses what the node agent would refuse or could not
// reproduce: devices, fifos, sockets, setuid/setgid files, absolute symlinks. It reads dir
// through an os.Root and never follows a symlink. The result is then run through Check, the
// agent's own unpacking, so a tarball Pack returns is one the agent accepts.
func Pack(dir string) (*Packed, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()

	var buf bytes.Buffer
	gz, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(gz)
	entries := 0
	// fs.WalkDir visits names in lexical order and does not follow symlinks.
	err = fs.WalkDir(root.FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if name == "." {
			return nil
		}
		fi, err := root.Lstat(name)
		if err != nil {
			return err
		}
		hdr, err := packHeader(root, name, fi)
		if err != nil {
			return err
		}
		entries++
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			return packFile(root, name, hdr.Size, tw)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	rep, err := Check(bytes.NewReader(buf.Bytes()))
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(buf.Bytes())
	return &Packed{Data: buf.Bytes(), SHA256: hex.EncodeToString(sum[:]), Entries: entries, CLI: rep.CLI}, nil
}

// packHeader is the normalised tar header of one path of the tree.
func packHeader(root *os.Root, name string, fi fs.FileInfo) (*tar.Header, error) {
	m := fi.Mode()
	if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
		return nil, fmt.Errorf("%s has setuid or setgid bits (mode %v); the node agent refuses them", name, m)
	}
	hdr := &tar.Header{Name: name, ModTime: PackTime, Uname: "root", Gname: "root", Format: tar.FormatPAX}
	switch {
	case m.IsDir():
		hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, name+"/", 0o755
	case m.IsRegular():
		hdr.Typeflag, hdr.Size, hdr.Mode = tar.TypeReg, fi.Size(), 0o644
		if m&0o111 != 0 {
			hdr.Mode = 0o755
		}
	case m&fs.ModeSymlink != 0:
		target, err := root.Readlink(name)
		if err != nil {
			return nil, err
		}
		if path.IsAbs(target) {
			return nil, fmt.Errorf("%s is a symlink to the absolute path %s; a release may only link inside itself", name, target)
		}
		hdr.Typeflag, hdr.Linkname, hdr.Mode = tar.TypeSymlink, target, 0o777
	default:
		return nil, fmt.Errorf("%s is a %s, not a file, folder or symlink; a release may hold no devices, fifos or sockets", name, strings.TrimSpace(typeName(m)))
	}
	return hdr, nil
}

func typeName(m fs.FileMode) string {
	switch {
	case m&fs.ModeDevice != 0:
		return "device"
	case m&fs.ModeNamedPipe != 0:
		return "fifo"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "special file"
}

// packFile copies one regular file, refusing one that changed size or type since it was listed.
func packFile(root *os.Root, name string, size int64, w io.Writer) error {
	f, err := root.OpenFile(name, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Size() != size {
		return fmt.Errorf("%s changed while it was packed", name)
	}
	n, err := io.Copy(w, io.LimitReader(f, size))
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if n != size {
		return fmt.Errorf("%s changed while it was packed", name)
	}
	return nil
}

// CheckReport is what Check found in a tarball the agent accepts.
type CheckReport struct {
	// Files and Bytes count the regular files unpacked and their size.
	Files int
	Bytes int64
	// CLI tells whether the tree holds CLIEntrypoint.
	CLI bool
}

// Check unpacks a release tarball into a temporary folder exactly as the node agent does
// (Extract with DefaultLimits) and removes it again. An error is the agent's refusal: a
// *RejectedError names the entry and the reason.
func Check(r io.Reader) (*CheckReport, error) {
	tmp, err := os.MkdirTemp("", "release-check-")
	if err != nil {
		return nil, err
	}
	defer func() { _ = removeTree(tmp) }()
	dest := tmp + "/tree"
	if err := os.Mkdir(dest, 0o700); err != nil {
		return nil, err
	}
	if err := Extract(r, dest, DefaultLimits()); err != nil {
		return nil, err
	}
	rep := &CheckReport{}
	root, err := os.OpenRoot(dest)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	err = fs.WalkDir(root.FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			rep.Files++
			rep.Bytes += fi.Size()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if fi, err := root.Lstat(CLIEntrypoint); err == nil && fi.Mode().IsRegular() {
		rep.CLI = true
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return rep, nil
}
