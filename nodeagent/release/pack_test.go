package release

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeTree makes a small runtime folder; files are created in the order given, with the mode
// and mtime given, so two calls can differ in everything Pack must not carry into the tarball.
func writeTree(t *testing.T, dir string, order []string, mode os.FileMode, mtime time.Time) {
	t.Helper()
	files := map[string]string{
		"agent_cli/__init__.py": "",
		"agent_cli/main.py":     "print('hi')\n",
		"gateways/script.py":    "print('script')\n",
		"bin/run":               "#!/bin/sh\n",
	}
	for _, name := range order {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		m := mode
		if strings.HasPrefix(name, "bin/") {
			m |= 0o111
		}
		if err := os.WriteFile(p, []byte(files[name]), m); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, m); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("../agent_cli/main.py", filepath.Join(dir, "bin", "main.py")); err != nil {
		t.Fatal(err)
	}
}

func TestPackIsDeterministic(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	writeTree(t, a, []string{"agent_cli/__init__.py", "agent_cli/main.py", "gateways/script.py", "bin/run"}, 0o644, time.Now())
	writeTree(t, b, []string{"bin/run", "gateways/script.py", "agent_cli/main.py", "agent_cli/__init__.py"}, 0o600, time.Unix(12345, 0))
	if err := os.Chown(filepath.Join(b, "gateways", "script.py"), 1234, 5678); err != nil {
		t.Fatal(err)
	}
	pa, err := Pack(a)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := Pack(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pa.Data, pb.Data) || pa.SHA256 != pb.SHA256 {
		t.Fatalf("two packs of the same tree differ: %s vs %s", pa.SHA256, pb.SHA256)
	}
	if !pa.CLI {
		t.Errorf("Pack did not see %s", CLIEntrypoint)
	}

	// The entries are sorted and carry nothing of the machine that packed them.
	zr, err := gzip.NewReader(bytes.NewReader(pa.Data))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if !h.ModTime.Equal(PackTime) || h.Uid != 0 || h.Gid != 0 || h.Uname != "root" || h.Gname != "root" {
			t.Errorf("%s: mtime %v owner %d:%d %s:%s", h.Name, h.ModTime, h.Uid, h.Gid, h.Uname, h.Gname)
		}
		want := map[string]int64{"bin/run": 0o755, "bin/": 0o755, "bin/main.py": 0o777}[h.Name]
		if want == 0 {
			want = map[byte]int64{tar.TypeDir: 0o755, tar.TypeReg: 0o644}[h.Typeflag]
		}
		if h.Mode != want {
			t.Errorf("%s: mode %#o, want %#o", h.Name, h.Mode, want)
		}
	}
	wantNames := "agent_cli/ agent_cli/__init__.py agent_cli/main.py bin/ bin/main.py bin/run gateways/ gateways/script.py"
	if got := strings.Join(names, " "); got != wantNames {
		t.Errorf("entries %s\nwant    %s", got, wantNames)
	}
	rep, err := Check(bytes.NewReader(pa.Data))
	if err != nil {
		t.Fatal(err)
	}
	if rep.Files != 4 || !rep.CLI {
		t.Errorf("Check: %+v", rep)
	}
}

func TestPackRefusesBadTrees(t *testing.T) {
	cases := map[string]struct {
		make func(dir string) error
		want string
	}{
		"fifo": {func(d string) error { return syscall.Mkfifo(filepath.Join(d, "pipe"), 0o644) }, "fifo"},
		"device": {func(d string) error {
			return syscall.Mknod(filepath.Join(d, "null"), syscall.S_IFCHR|0o644, int(1<<8|3))
		}, "device"},
		"setuid": {func(d string) error {
			p := filepath.Join(d, "su")
			if err := os.WriteFile(p, []byte("x"), 0o755); err != nil {
				return err
			}
			return os.Chmod(p, 0o755|os.ModeSetuid)
		}, "setuid"},
		"absolute symlink": {func(d string) error { return os.Symlink("/etc/shadow", filepath.Join(d, "shadow")) }, "absolute"},
		"escaping symlink": {func(d string) error { return os.Symlink("../../etc", filepath.Join(d, "up")) }, "escapes"},
		"escaping chain": {func(d string) error {
			if err := os.Mkdir(filepath.Join(d, "a"), 0o755); err != nil {
				return err
			}
			if err := os.Symlink("..", filepath.Join(d, "a", "up")); err != nil {
				return err
			}
			return os.Symlink("a/up/a/up/..", filepath.Join(d, "out"))
		}, "outside"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			d := t.TempDir()
			if err := tc.make(d); err != nil {
				t.Fatal(err)
			}
			p, err := Pack(d)
			if err == nil {
				t.Fatalf("Pack accepted the tree (%d entries)", p.Entries)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// A tarball made elsewhere gets the agent's verdict from Check.
func TestCheckRefusesHostileTarball(t *testing.T) {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	body := "x"
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "../escaped", Mode: 0o644, Size: int64(len(body))}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write([]byte(body)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := Check(bytes.NewReader(buf.Bytes()))
	var rej *RejectedError
	if !errors.As(err, &rej) || rej.Reason != ReasonUnsafeArchive {
		t.Fatalf("Check: %v, want an UnsafeArchive rejection", err)
	}
}
