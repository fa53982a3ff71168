package release

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Name limits stay well under NAME_MAX and PATH_MAX, so every path of a release can still be
// opened by its full name under a long releases folder.
const (
	maxNameLen      = 2048
	maxComponentLen = 255
	// maxSymlinkDepth matches the kernel's limit on nested symlinks (MAXSYMLINKS).
	maxSymlinkDepth = 40
	// maxEntryHeaderBytes bounds what the tar reader consumes to find one entry: its header,
	// its PAX or GNU extended headers and the previous entry's padding. Real archives need a
	// few KiB; the names and link targets it could carry are limited to maxNameLen anyway.
	maxEntryHeaderBytes = 64 << 10
)

// Mode bits of a tar header (the C values, not Go's fs.FileMode bits).
const (
	modeSetuid = 0o4000
	modeSetgid = 0o2000
	modeSticky = 0o1000
	modeExec   = 0o111
)

// Extract unpacks a gzip-compressed tar stream into dest (an existing empty folder) safely, or
// returns a *RejectedError when the archive is malformed, hostile or over lim (zero fields of lim
// take their DefaultLimits value). Only regular files, directories, relative symlinks that stay
// inside dest and hard links to files unpacked earlier are allowed. Ownership in the archive is
// ignored; file mtimes are kept. On success the tree is read-only: folders (dest included) are
// 0555, files 0444, or 0555 when the archive set any exec bit. Errors reading r or writing dest
// are returned as plain errors. On any error dest may hold a partial tree for the caller to
// remove. Exported so it can be fuzzed.
func Extract(r io.Reader, dest string, lim Limits) error {
	if err := checkEmpty(dest); err != nil {
		return err
	}
	root, err := os.OpenRoot(dest)
	if err != nil {
		return err
	}
	defer root.Close()

	x := &extractor{
		root: root,
		lim:  lim.withDefaults(),
		src:  &errReader{r: r},
		tree: &node{path: ".", kind: kindDir},
	}
	x.dirs = append(x.dirs, x.tree)
	zr, err := gzip.NewReader(x.src)
	if err != nil {
		return x.readErr(err, "gzip header")
	}
	meter := &headerMeter{r: zr, entryLimit: maxEntryHeaderBytes, totalLimit: x.lim.MaxHeaderBytes}
	tr := tar.NewReader(meter)
	for n := 1; ; n++ {
		meter.begin()
		hdr, err := tr.Next()
		meter.active = false
		if meter.over {
			return meter.reject(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return x.readErr(err, fmt.Sprintf("tar header of entry #%d", n))
		}
		if n > x.lim.MaxEntries {
			return reject(ReasonTooLarge, "the archive has more than %d entries (entry #%d is %s)", x.lim.MaxEntries, n, quote(hdr.Name))
		}
		if err := x.entry(hdr, tr); err != nil {
			return err
		}
	}
	// Reading on to the end of the gzip member verifies its checksum; padding after the tar
	// trailer is short in practice, so anything past a bound is not worth decompressing.
	if _, err := io.CopyN(io.Discard, zr, 1<<20); err != nil && err != io.EOF {
		return x.readErr(err, "gzip trailer")
	}
	// Only now is every symlink known: a link checked alone may escape through one added later.
	for _, l := range x.links {
		if _, err := x.resolve(l, 0); err != nil {
			return err
		}
	}
	return x.finish()
}

// errHeaderBudget stops archive/tar once a headerMeter's budget is spent.
var errHeaderBudget = errors.New("header budget spent")

// headerMeter counts the bytes archive/tar reads inside Next. PAX and GNU extended headers are
// consumed there without ever being returned as entries, so without this bound a stream of
// consecutive extended headers would cost unbounded work under any entry limit. Reading fails
// as soon as a budget is spent, so such a stream is refused after at most one budget of work.
type headerMeter struct {
	r          io.Reader
	active     bool  // inside Next
	entry      int64 // bytes read by the current Next
	total      int64 // bytes read by every Next so far
	entryLimit int64
	totalLimit int64
	over       bool
}

func (m *headerMeter) begin() { m.active, m.entry = true, 0 }

func (m *headerMeter) Read(p []byte) (int, error) {
	if !m.active {
		return m.r.Read(p)
	}
	if m.over {
		return 0, errHeaderBudget
	}
	n, err := m.r.Read(p)
	m.entry += int64(n)
	m.total += int64(n)
	if m.entry > m.entryLimit || m.total > m.totalLimit {
		m.over = true
		return n, errHeaderBudget
	}
	return n, err
}

// reject explains which budget the search for entry #n spent.
func (m *headerMeter) reject(n int) error {
	if m.entry > m.entryLimit {
		return reject(ReasonTooLarge, "entry #%d: its headers (with any PAX or GNU extended headers before it) take more than %d bytes", n, m.entryLimit)
	}
	return reject(ReasonTooLarge, "the archive's headers (PAX and GNU extended headers included) take more than %d bytes, at entry #%d", m.totalLimit, n)
}

func checkEmpty(dest string) error {
	f, err := os.Open(dest) //nolint:gosec // the store's own staging folder
	if err != nil {
		return err
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return err
	}
	if len(names) > 0 {
		return fmt.Errorf("extracting into %s: the folder is not empty", dest)
	}
	return nil
}

type kind uint8

const (
	// kindMissing stands for a path a symlink names but the archive does not contain.
	kindMissing kind = iota
	kindDir
	kindFile
	kindSymlink
)

func (k kind) String() string {
	switch k {
	case kindDir:
		return "directory"
	case kindFile:
		return "file"
	case kindSymlink:
		return "symlink"
	}
	return "missing path"
}

// node is one path of the tree being unpacked. The tree mirrors dest exactly (dest starts
// empty and nothing else writes to it), so every safety decision is made on it rather than on
// what the filesystem reports.
type node struct {
	path     string // relative to dest, "." for dest itself
	parent   *node  // nil for dest itself
	kind     kind
	children map[string]*node

	explicit bool      // a directory with its own entry, not only implied by deeper ones
	mtime    time.Time // of an explicit directory, applied once its contents are in place

	target     string // of a symlink
	resolving  bool
	resolved   bool
	resolvedTo *node
}

func (n *node) add(name string, k kind) *node {
	if n.children == nil {
		n.children = make(map[string]*node)
	}
	p := name
	if n.path != "." {
		p = n.path + "/" + name
	}
	c := &node{path: p, parent: n, kind: k}
	n.children[name] = c
	return c
}

type extractor struct {
	root     *os.Root // every write goes through it: a second fence around dest
	lim      Limits
	src      *errReader
	tree     *node
	dirs     []*node
	links    []*node
	declared int64 // sum of regular file sizes from headers
	written  int64 // bytes actually written
	buf      []byte
}

// errReader remembers the first failure of the underlying reader, which tells an I/O problem
// (worth a retry) apart from a malformed stream (the artifact's fault).
type errReader struct {
	r   io.Reader
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF && e.err == nil {
		e.err = err
	}
	return n, err
}

func (x *extractor) readErr(err error, what string) error {
	if x.src.err != nil {
		return fmt.Errorf("reading archive: %w", x.src.err)
	}
	return reject(ReasonBadArchive, "%s: %v", what, err)
}

// osErr classifies a failed filesystem call: the few errors an archive can provoke on purpose
// are rejections, the rest (no space, I/O) may pass.
func (x *extractor) osErr(name string, err error) error {
	if errors.Is(err, syscall.ENAMETOOLONG) || errors.Is(err, syscall.EMLINK) {
		return reject(ReasonUnsafeArchive, "entry %s: %v", quote(name), err)
	}
	return fmt.Errorf("entry %s: %w", quote(name), err)
}

// quote quotes a name from the archive for a message, shortening it: messages end up in
// object status, where a name of thousands of bytes helps nobody.
func quote(s string) string {
	const limit = 160
	if len(s) <= limit {
		return strconv.Quote(s)
	}
	return strconv.Quote(s[:limit]) + "..."
}

func unsafeEntry(name, format string, args ...any) error {
	return reject(ReasonUnsafeArchive, "entry %s: %s", quote(name), fmt.Sprintf(format, args...))
}

func (x *extractor) entry(hdr *tar.Header, r io.Reader) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // archive-wide metadata, e.g. the commit id git archive records
	}
	name := hdr.Name
	if msg := checkName(name); msg != "" {
		return unsafeEntry(name, "%s", msg)
	}
	if hdr.Mode&(modeSetuid|modeSetgid) != 0 {
		return unsafeEntry(name, "has setuid or setgid bits (mode %#o)", hdr.Mode)
	}
	if hdr.Mode&modeSticky != 0 && hdr.Typeflag != tar.TypeDir {
		return unsafeEntry(name, "has the sticky bit (mode %#o)", hdr.Mode)
	}
	clean := path.Clean(name)
	switch hdr.Typeflag {
	case tar.TypeDir:
		return x.dir(name, clean, hdr)
	case tar.TypeReg, tar.TypeGNUSparse:
		return x.file(name, clean, hdr, r)
	case tar.TypeSymlink:
		return x.symlink(name, clean, hdr.Linkname)
	case tar.TypeLink:
		return x.hardlink(name, clean, hdr.Linkname)
	case tar.TypeChar, tar.TypeBlock:
		return unsafeEntry(name, "is a device")
	case tar.TypeFifo:
		return unsafeEntry(name, "is a fifo")
	default:
		return unsafeEntry(name, "has unsupported type %q", hdr.Typeflag)
	}
}

// checkName returns why a name (or hard link target) is unacceptable, or "".
func checkName(name string) string {
	switch {
	case name == "":
		return "empty name"
	case strings.IndexByte(name, 0) >= 0:
		return "name contains NUL"
	case len(name) > maxNameLen:
		return fmt.Sprintf("name is longer than %d bytes", maxNameLen)
	case strings.HasPrefix(name, "/"):
		return "absolute path"
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "path has a '..' component"
		}
		if len(c) > maxComponentLen {
			return fmt.Sprintf("path component is longer than %d bytes", maxComponentLen)
		}
	}
	return ""
}

// parent returns the folder node an entry goes into, creating missing folders, and refuses any
// path that passes through a symlink or a file.
func (x *extractor) parent(name, clean string) (*node, string, error) {
	cur := x.tree
	if d := path.Dir(clean); d != "." {
		for _, c := range strings.Split(d, "/") {
			next := cur.children[c]
			switch {
			case next == nil:
				next = cur.add(c, kindDir)
				if err := x.root.Mkdir(next.path, 0o755); err != nil {
					return nil, "", x.osErr(name, err)
				}
				x.dirs = append(x.dirs, next)
			case next.kind == kindSymlink:
				return nil, "", unsafeEntry(name, "would be written through the symlink %s", quote(next.path))
			case next.kind != kindDir:
				return nil, "", unsafeEntry(name, "its parent %s is a %s, not a directory", quote(next.path), next.kind)
			}
			cur = next
		}
	}
	return cur, path.Base(clean), nil
}

// place finds the folder for a non-directory entry, whose path must be new.
func (x *extractor) place(name, clean string) (*node, string, error) {
	if clean == "." {
		return nil, "", unsafeEntry(name, "only a directory may name the archive's root")
	}
	parent, base, err := x.parent(name, clean)
	if err != nil {
		return nil, "", err
	}
	if ex := parent.children[base]; ex != nil {
		return nil, "", unsafeEntry(name, "duplicate entry: %s was already unpacked as a %s", quote(ex.path), ex.kind)
	}
	return parent, base, nil
}

func (x *extractor) dir(name, clean string, hdr *tar.Header) error {
	if clean == "." {
		if x.tree.explicit {
			return unsafeEntry(name, "duplicate entry for the archive's root")
		}
		// dest's own mtime is left to the caller.
		x.tree.explicit = true
		return nil
	}
	parent, base, err := x.parent(name, clean)
	if err != nil {
		return err
	}
	if ex := parent.children[base]; ex != nil {
		// A folder implied by earlier entries may still get its own entry, once.
		if ex.kind != kindDir || ex.explicit {
			return unsafeEntry(name, "duplicate entry: %s was already unpacked as a %s", quote(ex.path), ex.kind)
		}
		ex.explicit, ex.mtime = true, hdr.ModTime
		return nil
	}
	n := parent.add(base, kindDir)
	n.explicit, n.mtime = true, hdr.ModTime
	if err := x.root.Mkdir(n.path, 0o755); err != nil {
		return x.osErr(name, err)
	}
	x.dirs = append(x.dirs, n)
	return nil
}

func (x *extractor) file(name, clean string, hdr *tar.Header, r io.Reader) error {
	if hdr.Size < 0 {
		return reject(ReasonBadArchive, "entry %s: negative size %d", quote(name), hdr.Size)
	}
	if hdr.Size > x.lim.MaxUnpackedBytes-x.declared {
		return reject(ReasonTooLarge, "entry %s: its %d bytes bring the unpacked size over the limit of %d bytes", quote(name), hdr.Size, x.lim.MaxUnpackedBytes)
	}
	x.declared += hdr.Size
	parent, base, err := x.place(name, clean)
	if err != nil {
		return err
	}
	n := parent.add(base, kindFile)
	f, err := x.root.OpenFile(n.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return x.osErr(name, err)
	}
	err = x.copy(name, f, r)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = x.osErr(name, cerr)
	}
	if err != nil {
		return err
	}
	mode := os.FileMode(0o444)
	if hdr.Mode&modeExec != 0 {
		mode = 0o555
	}
	if err := x.root.Chmod(n.path, mode); err != nil {
		return x.osErr(name, err)
	}
	return x.setMtime(name, n.path, hdr.ModTime)
}

// copy writes one file's data, counting real bytes against the unpacked limit in case they
// ever differ from what the header declared.
func (x *extractor) copy(name string, w io.Writer, r io.Reader) error {
	if x.buf == nil {
		x.buf = make([]byte, 64<<10)
	}
	for {
		n, rerr := r.Read(x.buf)
		if n > 0 {
			x.written += int64(n)
			if x.written > x.lim.MaxUnpackedBytes {
				return reject(ReasonTooLarge, "entry %s: unpacked data exceeds the limit of %d bytes", quote(name), x.lim.MaxUnpackedBytes)
			}
			if _, werr := w.Write(x.buf[:n]); werr != nil {
				return x.osErr(name, werr)
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return x.readErr(rerr, "entry "+quote(name))
		}
	}
}

func (x *extractor) symlink(name, clean, target string) error {
	switch {
	case target == "":
		return unsafeEntry(name, "symlink has an empty target")
	case strings.IndexByte(target, 0) >= 0:
		return unsafeEntry(name, "symlink target contains NUL")
	case len(target) > maxNameLen:
		return unsafeEntry(name, "symlink target is longer than %d bytes", maxNameLen)
	case strings.HasPrefix(target, "/"):
		return unsafeEntry(name, "symlink target %s is absolute", quote(target))
	}
	parent, base, err := x.place(name, clean)
	if err != nil {
		return err
	}
	if climbsOut(parent.path, target) {
		return unsafeEntry(name, "symlink target %s escapes the archive", quote(target))
	}
	n := parent.add(base, kindSymlink)
	n.target = target
	if err := x.root.Symlink(target, n.path); err != nil {
		return x.osErr(name, err)
	}
	x.links = append(x.links, n)
	return nil
}

// climbsOut reports whether target, read as plain text relative to folder dir, ever goes above
// the root (even if it comes back down: the root's own name changes when it is renamed).
func climbsOut(dir, target string) bool {
	depth := 0
	if dir != "." {
		depth = strings.Count(dir, "/") + 1
	}
	for _, c := range strings.Split(target, "/") {
		switch c {
		case "", ".":
		case "..":
			if depth == 0 {
				return true
			}
			depth--
		default:
			depth++
		}
	}
	return false
}

func (x *extractor) hardlink(name, clean, target string) error {
	if msg := checkName(target); msg != "" {
		return unsafeEntry(name, "hard link target %s: %s", quote(target), msg)
	}
	t := x.lookup(path.Clean(target))
	if t == nil || t.kind != kindFile {
		return unsafeEntry(name, "hard link target %s is not a regular file unpacked earlier", quote(target))
	}
	parent, base, err := x.place(name, clean)
	if err != nil {
		return err
	}
	n := parent.add(base, kindFile)
	if err := x.root.Link(t.path, n.path); err != nil {
		return x.osErr(name, err)
	}
	return nil
}

// lookup finds an existing node by clean path without following symlinks.
func (x *extractor) lookup(p string) *node {
	cur := x.tree
	if p == "." {
		return cur
	}
	for _, c := range strings.Split(p, "/") {
		if cur = cur.children[c]; cur == nil {
			return nil
		}
	}
	return cur
}

// resolve follows a symlink through the finished tree the way the kernel would, and fails if
// the walk ever leaves the root. Paths the archive lacks are walked as plain text. Results are
// memoised, so checking every link costs time linear in the total length of the targets.
func (x *extractor) resolve(l *node, depth int) (*node, error) {
	if l.resolved {
		return l.resolvedTo, nil
	}
	if l.resolving || depth > maxSymlinkDepth {
		return nil, unsafeEntry(l.path, "symlink to %s is part of a loop or of a chain of more than %d symlinks", quote(l.target), maxSymlinkDepth)
	}
	l.resolving = true
	cur := l.parent
	for _, c := range strings.Split(l.target, "/") {
		switch c {
		case "", ".":
		case "..":
			if cur.parent == nil {
				return nil, unsafeEntry(l.path, "symlink target %s resolves outside the archive", quote(l.target))
			}
			cur = cur.parent
		default:
			next := cur.children[c]
			if next == nil {
				next = cur.add(c, kindMissing)
			}
			if next.kind == kindSymlink {
				var err error
				if next, err = x.resolve(next, depth+1); err != nil {
					return nil, err
				}
			}
			cur = next
		}
	}
	l.resolving, l.resolved, l.resolvedTo = false, true, cur
	return cur, nil
}

// finish applies folder mtimes once nothing more is added to them, then makes folders
// read-only.
func (x *extractor) finish() error {
	for _, d := range x.dirs {
		if d.explicit && d != x.tree {
			if err := x.setMtime(d.path, d.path, d.mtime); err != nil {
				return err
			}
		}
	}
	for _, d := range x.dirs {
		if err := x.root.Chmod(d.path, 0o555); err != nil {
			return x.osErr(d.path, err)
		}
	}
	return nil
}

// setMtime keeps the archive's mtime (Python checks it against its bytecode caches), skipping
// times a filesystem may refuse.
func (x *extractor) setMtime(name, p string, t time.Time) error {
	if t.IsZero() || t.Unix() < 0 || t.Unix() >= 1<<33 {
		return nil
	}
	if err := x.root.Chtimes(p, t, t); err != nil {
		return x.osErr(name, err)
	}
	return nil
}
