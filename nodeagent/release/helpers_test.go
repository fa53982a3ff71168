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
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

var testTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// longName is too long for a plain ustar header.
var longName = strings.Repeat("n", 120) + "/long-name.txt"

// ent is one tar entry of a test archive.
type ent struct {
	hdr  tar.Header
	body string
}

func reg(name, body string) ent {
	return ent{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body)), ModTime: testTime}, body}
}

func exe(name, body string) ent { return withMode(reg(name, body), 0o755) }

func dir(name string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: testTime}}
}

func symlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: testTime}}
}

func hardlink(name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: testTime}}
}

func special(name string, typ byte) ent {
	return ent{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o644, Devmajor: 1, Devminor: 3, ModTime: testTime}}
}

func withMode(e ent, mode int64) ent {
	e.hdr.Mode = mode
	return e
}

// rawTar writes entries as an uncompressed tar stream.
func rawTar(tb testing.TB, ents ...ent) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			tb.Fatalf("writing header %q: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			tb.Fatalf("writing body %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func gz(tb testing.TB, data []byte) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		tb.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

func tgz(tb testing.TB, ents ...ent) []byte { tb.Helper(); return gz(tb, rawTar(tb, ents...)) }

// nulNameTar is a tar stream whose PAX header gives the next entry a name with a NUL byte in it,
// which tar.Writer refuses to produce: the header block is patched by hand.
func nulNameTar(tb testing.TB) []byte {
	tb.Helper()
	rec := "path=evil\x00/../../x\n"
	rec = fmt.Sprintf("%d %s", len(rec)+3, rec) // 2-digit length, a space, the record
	data := rawTar(tb, reg("PaxHeaders/evil", rec), reg("evil", "x"))
	hdr := data[:512]
	hdr[156] = tar.TypeXHeader
	copy(hdr[148:156], "        ")
	sum := 0
	for _, b := range hdr {
		sum += int(b)
	}
	copy(hdr[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return data
}

// headerFlood is a tar stream whose one small file is preceded by n copies of an extended
// header: PAX records when gnu is false, else GNU long-name headers. archive/tar consumes all of
// them inside a single Next call, so none of them is an entry.
func headerFlood(tb testing.TB, n int, gnu bool) []byte {
	tb.Helper()
	e := reg("f", "x")
	if gnu {
		e.hdr.Name = strings.Repeat("g", 200) // too long for ustar: one long-name header
		e.hdr.Format = tar.FormatGNU
	} else {
		e.hdr.PAXRecords = map[string]string{"comment": "flood"}
	}
	one := rawTar(tb, e)
	const ext = 1024 // the extended header's block and its one block of data
	if one[156] != tar.TypeXHeader && one[156] != tar.TypeGNULongName {
		tb.Fatalf("the first header has type %q; want an extended header", one[156])
	}
	var buf bytes.Buffer
	for range n {
		buf.Write(one[:ext])
	}
	buf.Write(one)
	return buf.Bytes()
}

func sha(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

// validEntries is an archive using every allowed feature.
func validEntries() []ent {
	owned := reg("data/owned.txt", "owned by someone else")
	owned.hdr.Uid, owned.hdr.Gid, owned.hdr.Uname, owned.hdr.Gname = 4242, 4242, "nobody", "nogroup"
	return []ent{
		{hdr: tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header", PAXRecords: map[string]string{"comment": "0123abcd"}}},
		withMode(dir("./"), 0o700),
		exe("bin/run", "#!/bin/sh\necho run\n"),
		withMode(reg("bin/tool", "group may run it"), 0o610),
		reg("lib/pkg/mod.py", "print('hello')\n"),
		withMode(dir("lib/"), 0o700), // after its files
		hardlink("lib/pkg/alias.py", "lib/pkg/mod.py"),
		symlink("lib/current", "pkg"),
		symlink("lib/pkg/up", "../../bin/run"),
		symlink("chain", "lib/current/../current/mod.py"),
		symlink("dangling", "not/there/yet"),
		withMode(dir("share/"), 0o1777), // sticky folders are fine, the bit is dropped
		reg("data/empty", ""),
		owned,
		reg(longName, "deep"),
	}
}

// checkValidTree asserts what unpacking validEntries must produce.
func checkValidTree(t *testing.T, root string) {
	t.Helper()
	modes := map[string]fs.FileMode{
		".":                fs.ModeDir | 0o555,
		"bin":              fs.ModeDir | 0o555,
		"lib":              fs.ModeDir | 0o555,
		"lib/pkg":          fs.ModeDir | 0o555,
		"share":            fs.ModeDir | 0o555,
		"data":             fs.ModeDir | 0o555,
		"bin/run":          0o555,
		"bin/tool":         0o555,
		"lib/pkg/mod.py":   0o444,
		"lib/pkg/alias.py": 0o444,
		"data/empty":       0o444,
		"data/owned.txt":   0o444,
		"lib/current":      fs.ModeSymlink | 0o777,
		"lib/pkg/up":       fs.ModeSymlink | 0o777,
		"chain":            fs.ModeSymlink | 0o777,
		"dangling":         fs.ModeSymlink | 0o777,
		longName:           0o444,
	}
	for p, want := range modes {
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
		}
	}
	contents := map[string]string{
		"bin/run":          "#!/bin/sh\necho run\n",
		"lib/pkg/alias.py": "print('hello')\n",
		"lib/pkg/up":       "#!/bin/sh\necho run\n",
		"chain":            "print('hello')\n",
		"data/empty":       "",
	}
	for p, want := range contents {
		got, err := os.ReadFile(filepath.Join(root, p))
		if err != nil || string(got) != want {
			t.Errorf("%s: read %q, %v; want %q", p, got, err, want)
		}
	}
	a, errA := os.Stat(filepath.Join(root, "lib/pkg/mod.py"))
	b, errB := os.Stat(filepath.Join(root, "lib/pkg/alias.py"))
	if errA != nil || errB != nil || !os.SameFile(a, b) {
		t.Errorf("lib/pkg/alias.py is not a hard link of lib/pkg/mod.py (%v, %v)", errA, errB)
	}
	if errA == nil && !a.ModTime().Equal(testTime) {
		t.Errorf("lib/pkg/mod.py mtime %v, want the archive's %v", a.ModTime(), testTime)
	}
	if fi, err := os.Stat(filepath.Join(root, "lib")); err != nil || !fi.ModTime().Equal(testTime) {
		t.Errorf("lib mtime: %v, %v; want the archive's %v", fi, err, testTime)
	}
	if target, err := os.Readlink(filepath.Join(root, "lib/current")); err != nil || target != "pkg" {
		t.Errorf("lib/current -> %q, %v; want pkg", target, err)
	}
	if uid, ok := ownerOf(t, filepath.Join(root, "data/owned.txt")); ok && uid != os.Getuid() {
		t.Errorf("data/owned.txt is owned by uid %d; want the agent's %d", uid, os.Getuid())
	}
	if _, err := os.Lstat(filepath.Join(root, "pax_global_header")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the pax global header became a file: %v", err)
	}
}

// listDir returns the names in a folder, sorted.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

// tempDir is t.TempDir made removable even if a test leaves read-only trees in it.
func tempDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	t.Cleanup(func() { makeWritable(d) })
	return d
}

func asRejected(err error) (*RejectedError, bool) {
	var rej *RejectedError
	ok := errors.As(err, &rej)
	return rej, ok
}

// ownerOf returns the uid owning a file, where the platform reports one.
func ownerOf(t *testing.T, p string) (int, bool) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}
