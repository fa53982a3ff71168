package scripts_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// entry is what a second install must not change about a file: content, mode, owner, inode
// and modification time.
type entry struct {
	mode      fs.FileMode
	uid, gid  uint32
	ino       uint64
	mtime     int64
	sum, link string
}

func snapshot(t *testing.T, root string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		e := entry{mode: fi.Mode(), uid: st.Uid, gid: st.Gid, ino: st.Ino, mtime: st.Mtim.Nano()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			e.link, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p) //nolint:gosec // a test reading the temporary root it made
			if err != nil {
				return err
			}
			e.sum = fmt.Sprintf("%x", sha256.Sum256(b))
		}
		rel, _ := filepath.Rel(root, p)
		out[rel] = e
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func runInstall(t *testing.T, args ...string) string {
	t.Helper()
	script, err := repo.Path("hack/install-host.sh")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(script, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("install-host.sh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestInstallHostIsIdempotent installs the node agent into a fresh root twice: the first run
// puts binaries, unit and config in place with their modes, the second changes nothing (not
// even a modification time), a new binary is replaced while the administrator's agent.env is
// kept, and a symlink planted where a binary goes is replaced, never written through.
func TestInstallHostIsIdempotent(t *testing.T) {
	root, bin := t.TempDir(), t.TempDir()
	write := func(p, body string, mode os.FileMode) {
		t.Helper()
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(bin, "gateway-nodeagent"), "agent v1", 0o755)
	write(filepath.Join(bin, "gateway-launch"), "launch v1", 0o755)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	write(kubeconfig, "apiVersion: v1\nkind: Config\n", 0o644)
	// Someone with a say over the target root plants a link where the launcher goes.
	outside := filepath.Join(t.TempDir(), "victim")
	write(outside, "untouched", 0o644)
	if err := os.MkdirAll(filepath.Join(root, "usr/local/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(root, "usr/local/bin/gateway-launch")); err != nil {
		t.Fatal(err)
	}

	args := []string{"--root", root, "--bin", bin, "--kubeconfig", kubeconfig}
	runInstall(t, args...)
	unitSrc, err := repo.Path("config/nodeagent/gateway-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	unitText, err := os.ReadFile(unitSrc)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		mode os.FileMode
		body string
	}{
		"usr/local/bin/gateway-nodeagent":          {0o755, "agent v1"},
		"usr/local/bin/gateway-launch":             {0o755, "launch v1"},
		"etc/systemd/system/gateway-agent.service": {0o644, string(unitText)},
		"etc/gateway-operator/kubeconfig":          {0o600, "apiVersion: v1\nkind: Config\n"},
		"etc/gateway-operator":                     {fs.ModeDir | 0o700, ""},
		"etc/gateway-operator/agent.env":           {0o644, ""},
	}
	first := snapshot(t, root)
	for rel, w := range want {
		e, ok := first[rel]
		if !ok {
			t.Errorf("%s was not installed", rel)
			continue
		}
		if e.mode != w.mode {
			t.Errorf("%s: mode %v, want %v", rel, e.mode, w.mode)
		}
		if w.body != "" && e.sum != fmt.Sprintf("%x", sha256.Sum256([]byte(w.body))) {
			t.Errorf("%s: content differs from its source", rel)
		}
	}
	if b, _ := os.ReadFile(outside); string(b) != "untouched" {
		t.Errorf("the install wrote through a planted symlink: %q", b)
	}

	out := runInstall(t, args...)
	if !strings.Contains(out, "everything already in place") {
		t.Errorf("second run reported changes:\n%s", out)
	}
	second := snapshot(t, root)
	for rel, e := range first {
		if second[rel] != e {
			t.Errorf("second run changed %s: %+v -> %+v", rel, e, second[rel])
		}
	}
	if len(second) != len(first) {
		t.Errorf("second run added files: %d entries, then %d", len(first), len(second))
	}

	// An upgrade: a new agent binary is installed; the administrator's flags stay.
	write(filepath.Join(root, "etc/gateway-operator/agent.env"), "GATEWAY_AGENT_FLAGS=--host-labels=reported.gateway.agent.dev/rack=r1\n", 0o644)
	write(filepath.Join(bin, "gateway-nodeagent"), "agent v2", 0o755)
	out = runInstall(t, args...)
	if !strings.Contains(out, "installed /usr/local/bin/gateway-nodeagent") || strings.Contains(out, "gateway-launch") {
		t.Errorf("upgrade run:\n%s", out)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "usr/local/bin/gateway-nodeagent")); string(b) != "agent v2" {
		t.Errorf("the agent was not upgraded: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/gateway-operator/agent.env")); !strings.Contains(string(b), "rack=r1") {
		t.Errorf("the install overwrote agent.env: %q", b)
	}
}

// TestBinaryNamesAgree checks that the binaries make build produces (go build names each after
// its folder under cmd/) are the ones the host unit, the install script, the DaemonSet and the
// chart run.
func TestBinaryNamesAgree(t *testing.T) {
	cmdDir, err := repo.Path("cmd")
	if err != nil {
		t.Fatal(err)
	}
	built := map[string]bool{}
	ents, err := os.ReadDir(cmdDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(cmdDir, e.Name(), "main.go")); err == nil {
			built[e.Name()] = true
		}
	}
	binRef := regexp.MustCompile(`(?:/usr/local/bin/|\$bin/)(gateway-[a-z-]+)`)
	for _, f := range []string{
		"config/nodeagent/gateway-agent.service",
		"config/nodeagent/daemonset.yaml",
		"charts/gateway-operator/templates/agent.yaml",
		"hack/install-host.sh",
	} {
		p, err := repo.Path(f)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		refs := binRef.FindAllStringSubmatch(string(b), -1)
		names := map[string]bool{}
		for _, m := range refs {
			names[m[1]] = true
			if !built[m[1]] {
				t.Errorf("%s runs %s, which make build does not produce (cmd/ has %v)", f, m[1], built)
			}
		}
		for _, n := range []string{"gateway-nodeagent", "gateway-launch"} {
			if !names[n] {
				t.Errorf("%s does not name %s", f, n)
			}
		}
	}
}

// TestHostArchiveInstalls packs the host install twice (the same bytes both times), unpacks
// it, and installs from the unpacked archive alone: the archive carries the binaries under the
// names the unit runs, the unit and the install script.
func TestHostArchiveInstalls(t *testing.T) {
	script, err := repo.Path("hack/dist-host.sh")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	for _, f := range []string{"gateway-nodeagent", "gateway-launch"} {
		if err := os.WriteFile(filepath.Join(bin, f), []byte(f+" build"), 0o755); err != nil { //nolint:gosec // an executable
			t.Fatal(err)
		}
	}
	out := t.TempDir()
	var archives [2][]byte
	for i := range archives {
		p := filepath.Join(out, fmt.Sprintf("host-%d.tar.gz", i))
		if b, err := exec.Command(script, p, bin).CombinedOutput(); err != nil { //nolint:gosec // our script
			t.Fatalf("dist-host.sh: %v\n%s", err, b)
		}
		if archives[i], err = os.ReadFile(p); err != nil { //nolint:gosec // our output
			t.Fatal(err)
		}
	}
	if !bytes.Equal(archives[0], archives[1]) {
		t.Error("two packs of the same files differ")
	}
	list, err := exec.Command("tar", "-tzf", filepath.Join(out, "host-0.tar.gz")).Output() //nolint:gosec // our output
	if err != nil {
		t.Fatal(err)
	}
	want := "bin/\nbin/gateway-launch\nbin/gateway-nodeagent\nconfig/\nconfig/nodeagent/\nconfig/nodeagent/gateway-agent.service\nhack/\nhack/install-host.sh\n"
	if string(list) != want {
		t.Errorf("archive holds:\n%s\nwant:\n%s", list, want)
	}
	unpacked, root := t.TempDir(), t.TempDir()
	if b, err := exec.Command("tar", "-xzf", filepath.Join(out, "host-0.tar.gz"), "-C", unpacked).CombinedOutput(); err != nil { //nolint:gosec // our output
		t.Fatalf("unpack: %v\n%s", err, b)
	}
	if b, err := exec.Command(filepath.Join(unpacked, "hack/install-host.sh"), "--root", root).CombinedOutput(); err != nil { //nolint:gosec // the unpacked script
		t.Fatalf("install from the archive: %v\n%s", err, b)
	}
	for _, f := range []string{"gateway-nodeagent", "gateway-launch"} {
		if b, _ := os.ReadFile(filepath.Join(root, "usr/local/bin", f)); string(b) != f+" build" { //nolint:gosec // our temporary root
			t.Errorf("%s installed from the archive holds %q", f, b)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "etc/systemd/system/gateway-agent.service")); err != nil {
		t.Error(err)
	}
}
