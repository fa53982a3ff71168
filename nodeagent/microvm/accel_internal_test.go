package microvm

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// TestKVMAccess: QEMU's user gets KVM only with read-write access to a character device, and
// through a group only when that group is not root's; every refusal says why in one sentence.
func TestKVMAccess(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" {
			t.Fatal("making device nodes needs root, and GATEWAY_TEST_REQUIRE_ALL is set")
		}
		t.Skip("making device nodes needs root")
	}
	const uid, gid = 64531, 64531
	dir := t.TempDir()
	dev := func(name string, mode uint32, owner, group int) string {
		p := filepath.Join(dir, name)
		if err := unix.Mknod(p, unix.S_IFCHR|mode, int(unix.Mkdev(10, 232))); err != nil { //nolint:gosec // a device number fits
			t.Fatal(err)
		}
		if err := os.Chown(p, owner, group); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, os.FileMode(mode)); err != nil {
			t.Fatal(err)
		}
		return p
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		path   string
		groups []uint32
		why    string
	}{
		"missing":           {filepath.Join(dir, "none"), nil, "no /dev/kvm on the host"},
		"a regular file":    {file, nil, "not a character device"},
		"root's alone":      {dev("root", 0o600, 0, 0), nil, "cannot open /dev/kvm (mode 0600, owner 0, group 0)"},
		"root's group":      {dev("rootgroup", 0o660, 0, 0), nil, "cannot open"},
		"group read-only":   {dev("ro", 0o640, 0, 78), nil, "cannot open"},
		"group kvm":         {dev("kvm", 0o660, 0, 78), []uint32{78}, ""},
		"QEMU's own group":  {dev("own", 0o660, 0, gid), nil, ""},
		"QEMU's own device": {dev("user", 0o600, uid, 0), nil, ""},
		"everyone":          {dev("all", 0o666, 0, 0), nil, ""},
	} {
		groups, why := kvmAccess(tc.path, uid, gid)
		if !reflect.DeepEqual(groups, tc.groups) || (tc.why == "") != (why == "") || !strings.Contains(why, tc.why) {
			t.Errorf("%s: groups %v, reason %q; want %v and a reason with %q", name, groups, why, tc.groups, tc.why)
		}
	}
}

// TestOneLine: a reason built from QEMU's output is one line of printable UTF-8 within its bound.
func TestOneLine(t *testing.T) {
	for in, want := range map[string]string{
		"qemu: failed\n\tto set MSR\x1b[31m 0x10a\r\n": "qemu: failed to set MSR [31m 0x10a",
		"bad \xff byte": "bad ? byte",
	} {
		if got := oneLine(in, 240); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", in, got, want)
		}
	}
	long := strings.Repeat("é", 200)
	got := oneLine(long, 240)
	if len(got) > 240 || !utf8.ValidString(got) || !strings.HasSuffix(got, "...") {
		t.Errorf("oneLine of 400 bytes: %d bytes %q", len(got), got)
	}
}
