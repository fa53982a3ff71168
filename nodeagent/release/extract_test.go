package release

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type hostileCase struct {
	name   string
	ents   []ent
	raw    []byte // the whole .tar.gz, when tar.Writer cannot produce it
	lim    Limits
	reason string
}

func (c hostileCase) archive(tb testing.TB) []byte {
	if c.raw != nil {
		return c.raw
	}
	return tgz(tb, c.ents...)
}

// hostileCases lists one archive per extraction rule.
func hostileCases(tb testing.TB) []hostileCase {
	x := reg("f", "x")
	full := tgz(tb, validEntries()...)
	return []hostileCase{
		{name: "absolute path", ents: []ent{reg("/etc/evil", "x")}, reason: ReasonUnsafeArchive},
		{name: "absolute dir", ents: []ent{dir("/tmp/evil/")}, reason: ReasonUnsafeArchive},
		{name: "dotdot", ents: []ent{reg("../evil", "x")}, reason: ReasonUnsafeArchive},
		{name: "dotdot deep", ents: []ent{reg("a/../../evil", "x")}, reason: ReasonUnsafeArchive},
		{name: "dotdot staying inside", ents: []ent{reg("a/../b", "x")}, reason: ReasonUnsafeArchive},
		{name: "dotdot dir", ents: []ent{dir("x/../../")}, reason: ReasonUnsafeArchive},
		{name: "dotdot alone", ents: []ent{dir("..")}, reason: ReasonUnsafeArchive},
		{name: "file through symlink", ents: []ent{dir("real/"), symlink("lnk", "real"), reg("lnk/f", "x")}, reason: ReasonUnsafeArchive},
		{name: "dir through symlink", ents: []ent{symlink("lnk", "."), dir("lnk/sub/")}, reason: ReasonUnsafeArchive},
		{name: "symlink through symlink", ents: []ent{symlink("lnk", "."), symlink("lnk/s", "x")}, reason: ReasonUnsafeArchive},
		{name: "hard link through symlink", ents: []ent{x, symlink("lnk", "."), hardlink("lnk/g", "f")}, reason: ReasonUnsafeArchive},
		{name: "symlink absolute", ents: []ent{symlink("lnk", "/etc")}, reason: ReasonUnsafeArchive},
		{name: "symlink escapes", ents: []ent{symlink("lnk", "../outside")}, reason: ReasonUnsafeArchive},
		{name: "nested symlink escapes", ents: []ent{symlink("a/b/lnk", "../../../x")}, reason: ReasonUnsafeArchive},
		{name: "symlink climbs out and back", ents: []ent{symlink("lnk", "../releases/x")}, reason: ReasonUnsafeArchive},
		{name: "symlink escapes through a later link", ents: []ent{symlink("esc", "dot/.."), symlink("dot", ".")}, reason: ReasonUnsafeArchive},
		{name: "symlink escapes through an earlier link", ents: []ent{symlink("dot", "."), symlink("esc", "dot/..")}, reason: ReasonUnsafeArchive},
		{name: "symlink escapes through a nested link", ents: []ent{symlink("a/b/up", "../.."), symlink("a/esc", "b/up/..")}, reason: ReasonUnsafeArchive},
		{name: "symlink loop", ents: []ent{symlink("a", "b"), symlink("b", "a")}, reason: ReasonUnsafeArchive},
		{name: "symlink to itself", ents: []ent{symlink("a", "a")}, reason: ReasonUnsafeArchive},
		{name: "symlink empty target", ents: []ent{symlink("a", "")}, reason: ReasonUnsafeArchive},
		{name: "hard link absolute", ents: []ent{hardlink("h", "/etc/passwd")}, reason: ReasonUnsafeArchive},
		{name: "hard link escapes", ents: []ent{hardlink("h", "../x")}, reason: ReasonUnsafeArchive},
		{name: "hard link missing target", ents: []ent{hardlink("h", "nope")}, reason: ReasonUnsafeArchive},
		{name: "hard link to later file", ents: []ent{hardlink("h", "f"), x}, reason: ReasonUnsafeArchive},
		{name: "hard link to dir", ents: []ent{dir("d/"), hardlink("h", "d")}, reason: ReasonUnsafeArchive},
		{name: "hard link to root", ents: []ent{hardlink("h", ".")}, reason: ReasonUnsafeArchive},
		{name: "hard link to symlink", ents: []ent{x, symlink("s", "f"), hardlink("h", "s")}, reason: ReasonUnsafeArchive},
		{name: "char device", ents: []ent{special("dev/null", tar.TypeChar)}, reason: ReasonUnsafeArchive},
		{name: "block device", ents: []ent{special("dev/sda", tar.TypeBlock)}, reason: ReasonUnsafeArchive},
		{name: "fifo", ents: []ent{special("pipe", tar.TypeFifo)}, reason: ReasonUnsafeArchive},
		{name: "contiguous file type", ents: []ent{special("cont", tar.TypeCont)}, reason: ReasonUnsafeArchive},
		{name: "setuid file", ents: []ent{withMode(reg("su", "x"), 0o4755)}, reason: ReasonUnsafeArchive},
		{name: "setgid file", ents: []ent{withMode(reg("sg", "x"), 0o2755)}, reason: ReasonUnsafeArchive},
		{name: "sticky file", ents: []ent{withMode(reg("st", "x"), 0o1644)}, reason: ReasonUnsafeArchive},
		{name: "setgid dir", ents: []ent{withMode(dir("d/"), 0o2755)}, reason: ReasonUnsafeArchive},
		{name: "setuid symlink", ents: []ent{withMode(symlink("s", "x"), 0o4777)}, reason: ReasonUnsafeArchive},
		{name: "too many entries", ents: []ent{reg("a", ""), reg("b", ""), reg("c", ""), reg("d", "")}, lim: Limits{MaxEntries: 3}, reason: ReasonTooLarge},
		{name: "too many entries counting pax globals", ents: validEntries(), lim: Limits{MaxEntries: len(validEntries()) - 1}, reason: ReasonTooLarge},
		{name: "consecutive pax headers", raw: gz(tb, headerFlood(tb, 100, false)), reason: ReasonTooLarge},
		{name: "consecutive gnu long-name headers", raw: gz(tb, headerFlood(tb, 100, true)), reason: ReasonTooLarge},
		{name: "pax headers over the archive's header budget", ents: paxEntries(8), lim: Limits{MaxHeaderBytes: 8 << 10}, reason: ReasonTooLarge},
		{name: "file over unpacked limit", ents: []ent{reg("big", strings.Repeat("0", 101))}, lim: Limits{MaxUnpackedBytes: 100}, reason: ReasonTooLarge},
		{name: "files over unpacked limit", ents: []ent{reg("a", strings.Repeat("0", 40)), reg("b", strings.Repeat("0", 40)), reg("c", strings.Repeat("0", 40))}, lim: Limits{MaxUnpackedBytes: 100}, reason: ReasonTooLarge},
		{name: "duplicate file", ents: []ent{x, x}, reason: ReasonUnsafeArchive},
		{name: "duplicate file spelled differently", ents: []ent{x, reg("./f", "y")}, reason: ReasonUnsafeArchive},
		{name: "duplicate dir", ents: []ent{dir("d/"), dir("d")}, reason: ReasonUnsafeArchive},
		{name: "duplicate implied dir", ents: []ent{reg("d/f", "x"), dir("d/"), dir("d/")}, reason: ReasonUnsafeArchive},
		{name: "duplicate root", ents: []ent{dir("./"), dir(".")}, reason: ReasonUnsafeArchive},
		{name: "dir then file", ents: []ent{dir("d/"), reg("d", "x")}, reason: ReasonUnsafeArchive},
		{name: "file then dir", ents: []ent{x, dir("f/")}, reason: ReasonUnsafeArchive},
		{name: "implied dir then file", ents: []ent{reg("d/f", "x"), reg("d", "x")}, reason: ReasonUnsafeArchive},
		{name: "symlink then dir", ents: []ent{symlink("s", "."), dir("s/")}, reason: ReasonUnsafeArchive},
		{name: "symlink replacing file", ents: []ent{x, symlink("f", "g")}, reason: ReasonUnsafeArchive},
		{name: "hard link replacing file", ents: []ent{x, reg("g", "y"), hardlink("f", "g")}, reason: ReasonUnsafeArchive},
		{name: "file under file", ents: []ent{x, reg("f/g", "y")}, reason: ReasonUnsafeArchive},
		{name: "file as root", ents: []ent{reg(".", "x")}, reason: ReasonUnsafeArchive},
		{name: "component too long", ents: []ent{reg(strings.Repeat("n", 256), "x")}, reason: ReasonUnsafeArchive},
		{name: "name too long", ents: []ent{reg(strings.Repeat("d/", 1100)+"x", "x")}, reason: ReasonUnsafeArchive},
		// archive/tar refuses the header before Extract sees the name.
		{name: "NUL in name", raw: gz(tb, nulNameTar(tb)), reason: ReasonBadArchive},
		{name: "not gzip", raw: []byte("this is not a tarball"), reason: ReasonBadArchive},
		{name: "gzip of garbage", raw: gz(tb, bytes.Repeat([]byte("garbage!"), 200)), reason: ReasonBadArchive},
		{name: "truncated", raw: full[:len(full)/2], reason: ReasonBadArchive},
		{name: "truncated trailer", raw: full[:len(full)-4], reason: ReasonBadArchive},
	}
}

func TestExtractValid(t *testing.T) {
	dest := filepath.Join(tempDir(t), "dest")
	if err := os.Mkdir(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := Extract(bytes.NewReader(tgz(t, validEntries()...)), dest, Limits{}); err != nil {
		t.Fatal(err)
	}
	checkValidTree(t, dest)
	checkSafeTree(t, dest)
}

func TestExtractHostile(t *testing.T) {
	for _, c := range hostileCases(t) {
		t.Run(c.name, func(t *testing.T) {
			base := tempDir(t)
			dest := filepath.Join(base, "dest")
			if err := os.Mkdir(dest, 0o755); err != nil {
				t.Fatal(err)
			}
			err := Extract(bytes.NewReader(c.archive(t)), dest, c.lim)
			rej, ok := asRejected(err)
			if !ok {
				t.Fatalf("Extract: %v; want a RejectedError", err)
			}
			t.Log(rej)
			if rej.Reason != c.reason {
				t.Errorf("Reason %q (%v); want %q", rej.Reason, rej, c.reason)
			}
			if got := listDir(t, base); len(got) != 1 || got[0] != "dest" {
				t.Errorf("the folder around dest now holds %v", got)
			}
		})
	}
}

// TestExtractAtLimits checks that the limits are inclusive.
func TestExtractAtLimits(t *testing.T) {
	ents := []ent{reg("a", strings.Repeat("a", 60)), reg("b", strings.Repeat("b", 40)), dir("c/")}
	if err := Extract(bytes.NewReader(tgz(t, ents...)), tempDir(t), Limits{MaxEntries: 3, MaxUnpackedBytes: 100}); err != nil {
		t.Fatal(err)
	}
}

// TestExtractCountsCopiedBytes feeds a file whose data runs past its declared size, which
// archive/tar never does, to the copy step.
func TestExtractCountsCopiedBytes(t *testing.T) {
	x := &extractor{lim: Limits{MaxUnpackedBytes: 100}, src: &errReader{}}
	x.declared = 10
	var sink bytes.Buffer
	err := x.copy("f", &sink, strings.NewReader(strings.Repeat("z", 101)))
	if rej, ok := asRejected(err); !ok || rej.Reason != ReasonTooLarge {
		t.Fatalf("copy: %v; want TooLarge", err)
	}
	if sink.Len() > 100 {
		t.Errorf("%d bytes were written past the limit", sink.Len())
	}
}

// failingReader serves some bytes of an archive and then fails like a broken disk or network.
type failingReader struct {
	data []byte
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, f.err
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

func TestExtractReadErrorIsNotRejected(t *testing.T) {
	boom := errors.New("disk on fire")
	// Incompressible bodies make the archive long enough to fail in the middle.
	var ents []ent
	for i := range 20 {
		ents = append(ents, reg(strings.Repeat("f", i+1), string(randomBytes(uint64(i), 4096))))
	}
	data := tgz(t, ents...)
	for _, cut := range []int{0, 5, len(data) / 2, len(data) - 1} {
		err := Extract(&failingReader{data: data[:cut], err: boom}, tempDir(t), Limits{})
		if !errors.Is(err, boom) {
			t.Errorf("cut at %d: %v; want the reader's error", cut, err)
		}
		if _, ok := asRejected(err); ok {
			t.Errorf("cut at %d: an I/O error was reported as a rejection: %v", cut, err)
		}
	}
	err := Extract(ctxReader{canceledCtx(), bytes.NewReader(data)}, tempDir(t), Limits{})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("canceled: %v; want context.Canceled", err)
	}
}

func TestExtractNeedsEmptyDest(t *testing.T) {
	dest := t.TempDir()
	if err := os.WriteFile(filepath.Join(dest, "f"), []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := Extract(bytes.NewReader(tgz(t, reg("g", "new"))), dest, Limits{})
	if err == nil {
		t.Fatal("Extract into a non-empty folder succeeded")
	}
	if _, ok := asRejected(err); ok {
		t.Errorf("a caller's mistake was reported as a bad artifact: %v", err)
	}
}

func TestRejectedErrorMessageNamesEntry(t *testing.T) {
	err := Extract(bytes.NewReader(tgz(t, reg("ok", "x"), reg("sub/../../evil", "x"))), t.TempDir(), Limits{})
	if err == nil || !strings.Contains(err.Error(), `"sub/../../evil"`) || !strings.HasPrefix(err.Error(), ReasonUnsafeArchive+": ") {
		t.Errorf("error %q does not start with the reason and name the entry", err)
	}
}

// TestEntryRejectsNUL covers the NUL rule below archive/tar, which already refuses such names
// in the formats it parses (see the "NUL in name" hostile case).
func TestEntryRejectsNUL(t *testing.T) {
	x := &extractor{lim: DefaultLimits(), src: &errReader{}, tree: &node{path: ".", kind: kindDir}}
	for _, h := range []*tar.Header{
		{Typeflag: tar.TypeReg, Name: "a\x00/../../b"},
		{Typeflag: tar.TypeDir, Name: "d\x00/"},
		{Typeflag: tar.TypeSymlink, Name: "s", Linkname: "t\x00"},
		{Typeflag: tar.TypeLink, Name: "h", Linkname: "f\x00"},
	} {
		err := x.entry(h, strings.NewReader(""))
		if rej, ok := asRejected(err); !ok || rej.Reason != ReasonUnsafeArchive || !strings.Contains(rej.Message, "NUL") {
			t.Errorf("%q -> %q: %v; want UnsafeArchive about NUL", h.Name, h.Linkname, err)
		}
	}
}

func TestClimbsOut(t *testing.T) {
	for _, c := range []struct {
		dir, target string
		want        bool
	}{
		{".", "a", false},
		{".", ".", false},
		{".", "..", true},
		{"a", "..", false},
		{"a", "../..", true},
		{"a/b", "../../c/./d", false},
		{"a", "../../a/x", true},
		{".", "a//b/../../c", false},
		{".", "a/../../", true},
	} {
		if got := climbsOut(c.dir, c.target); got != c.want {
			t.Errorf("climbsOut(%q, %q) = %v, want %v", c.dir, c.target, got, c.want)
		}
	}
}

func canceledCtx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	// A fixed xorshift stream: incompressible enough and the same on every run.
	s := seed*0x9e3779b97f4a7c15 + 1
	for i := range b {
		s ^= s << 13
		s ^= s >> 7
		s ^= s << 17
		b[i] = byte(s)
	}
	return b
}

// paxEntries are n files that each carry a PAX record, about 1.5 KiB of headers apiece.
func paxEntries(n int) []ent {
	var ents []ent
	for i := range n {
		e := reg(fmt.Sprintf("f%d", i), "x")
		e.hdr.PAXRecords = map[string]string{"comment": "one record"}
		ents = append(ents, e)
	}
	return ents
}

// TestExtractHeaderFlood feeds a large stream of consecutive PAX headers, none of which is an
// entry: it must be refused after reading little of it, naming the headers.
func TestExtractHeaderFlood(t *testing.T) {
	const n = 1 << 16 // 64 MiB of headers once unpacked
	for _, gnu := range []bool{false, true} {
		data := gz(t, headerFlood(t, n, gnu))
		in := &countingReader{r: bytes.NewReader(data)}
		err := Extract(in, tempDir(t), Limits{MaxEntries: 1})
		rej, ok := asRejected(err)
		if !ok || rej.Reason != ReasonTooLarge || !strings.Contains(rej.Message, "headers") {
			t.Fatalf("gnu=%v: Extract: %v; want TooLarge naming the headers", gnu, err)
		}
		t.Logf("gnu=%v: %v; read %d of %d compressed bytes", gnu, rej, in.n, len(data))
		if in.n > int64(len(data)/4) {
			t.Errorf("gnu=%v: read %d of %d compressed bytes before refusing", gnu, in.n, len(data))
		}
	}
}

// TestExtractHeadersWithinBudget checks that ordinary PAX archives fit the default budget and
// that the budget is inclusive.
func TestExtractHeadersWithinBudget(t *testing.T) {
	data := tgz(t, paxEntries(8)...)
	if err := Extract(bytes.NewReader(data), tempDir(t), Limits{}); err != nil {
		t.Fatalf("default limits: %v", err)
	}
	// Everything archive/tar reads while looking for entries: the whole stream but the eight
	// one-byte bodies.
	raw := rawTar(t, paxEntries(8)...)
	budget := int64(len(raw)) - 8
	if err := Extract(bytes.NewReader(data), tempDir(t), Limits{MaxHeaderBytes: budget}); err != nil {
		t.Fatalf("a budget of exactly %d bytes: %v", budget, err)
	}
	err := Extract(bytes.NewReader(data), tempDir(t), Limits{MaxHeaderBytes: budget - 1})
	if rej, ok := asRejected(err); !ok || rej.Reason != ReasonTooLarge {
		t.Fatalf("a budget of %d bytes: %v; want TooLarge", budget-1, err)
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
