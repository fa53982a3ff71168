package apply_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// withMaterial gives an instance a secret variable and two secret files, as the agent resolves
// them from Secrets, and asks its gateway to report what it read.
func withMaterial(in apply.Instance, token, file, digest string, extra ...v1.MaterialFile) apply.Instance {
	in.Env = []v1.EnvVar{{Name: "TOKEN", Value: token}, {Name: "REPORT_SHA256", Value: "env:TOKEN,file:config/token,file:.env"}}
	in.Files = append([]v1.MaterialFile{
		{Path: "config/token", Mode: 0o400, Data: []byte(file)},
		{Path: ".env", Mode: 0o600, Data: []byte("A=" + file + "\n")},
	}, extra...)
	in.MaterialDigest = digest
	return in
}

// TestMaterialOnTheHost: secret variables land in the root-only env file and secret files in
// the profile's home, the user's with the mode asked for; the gateway reads both, a sibling's
// user reads neither; the proof names the digest the process started with; a failed apply
// restores the previous material (files added by it removed), and removing the profile takes
// its files off the host even though its home is kept.
func TestMaterialOnTheHost(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	broken := f.publish(agentruntime.Options{Version: "2.0.0-broken", CrashAtStart: true})
	d1, d2 := "sha256:"+strings.Repeat("1", 64), "sha256:"+strings.Repeat("2", 64)
	core := withMaterial(instance("core", r1), "env-secret-1", "file-secret-1", d1)
	out := f.mustApply(core)
	f.mustApply(instance("api", r1))
	if out.Alignment.MaterialDigest != d1 {
		t.Errorf("proof names material %q; want %q", out.Alignment.MaterialDigest, d1)
	}
	gw := filepath.Join(f.host.Root, "opt/agent/gateways/core")
	assertRead := func(token, file string) {
		t.Helper()
		st := f.status("core")
		want := map[string]string{"env:TOKEN": sum(token), "file:config/token": sum(file), "file:.env": sum("A=" + file + "\n")}
		for k, v := range want {
			if st.Read[k] != v {
				t.Errorf("the gateway read %s as %s; want sha256 %s", k, st.Read[k], v)
			}
		}
	}
	assertRead("env-secret-1", "file-secret-1")
	uid := f.status("core").UID
	for _, c := range []struct {
		path string
		mode os.FileMode
		uid  int
	}{{"env", 0o600, 0}, {"material.json", 0o600, 0}, {"home/config/token", 0o400, uid}, {"home/.env", 0o600, uid}, {"home/config", 0o700, uid}} {
		fi, err := os.Lstat(filepath.Join(gw, c.path))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); fi.Mode().Perm() != c.mode || int(st.Uid) != c.uid {
			t.Errorf("%s: mode %v uid %d; want %v uid %d", c.path, fi.Mode().Perm(), st.Uid, c.mode, c.uid)
		}
	}
	// A sibling's gateway, as its own user in its own sandbox, reads none of it.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, p := range []string{"home/config/token", "home/.env", "env", "material.json"} {
		o, err := f.host.Exec(ctx, "systemd-run", "--wait", "--pipe", "--quiet", "--property=User=agent-api",
			"/usr/bin/cat", "/opt/agent/gateways/core/"+p)
		if err == nil || strings.Contains(string(o), "secret-1") || !strings.Contains(string(o), "Permission denied") {
			t.Errorf("agent-api reading core's %s: %v\n%s", p, err, o)
		}
	}

	// New material with a release that fails: the host returns to the last good release with
	// the material it ran.
	next := withMaterial(instance("core", broken), "env-secret-2", "file-secret-2", d2, v1.MaterialFile{Path: "config/extra", Mode: 0o600, Data: []byte("x")})
	_, err := f.applier.Apply(context.Background(), next)
	var failure *apply.Failure
	if !errors.As(err, &failure) || !failure.RolledBack {
		t.Fatalf("apply of a broken release: %v; want a rollback", err)
	}
	assertRead("env-secret-1", "file-secret-1")
	if _, err := os.Lstat(filepath.Join(gw, "home/config/extra")); !os.IsNotExist(err) {
		t.Errorf("a file of the failed material is left: %v", err)
	}
	if env, _ := os.ReadFile(filepath.Join(gw, "env")); !strings.Contains(string(env), d1) || strings.Contains(string(env), "secret-2") {
		t.Errorf("env file after rollback:\n%s", env)
	}

	// The same material on a good release goes through; then removal takes it away.
	next.Release = r1
	out = f.mustApply(next)
	if out.Alignment.MaterialDigest != d2 || !out.Restarted {
		t.Errorf("rotated: digest %q restarted %v", out.Alignment.MaterialDigest, out.Restarted)
	}
	assertRead("env-secret-2", "file-secret-2")
	if err := f.applier.Remove(context.Background(), "core", false); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"home/config/token", "home/.env", "home/config/extra", "env", "material.json"} {
		if _, err := os.Lstat(filepath.Join(gw, p)); !os.IsNotExist(err) {
			t.Errorf("%s is left after removal: %v", p, err)
		}
	}
	if _, err := os.Stat(filepath.Join(gw, "home")); err != nil {
		t.Errorf("the retained home is gone: %v", err)
	}
}

// TestFailedMaterialWriteLeavesNoSecret: when a file cannot be written (the gateway put a
// folder at its path), the files already written are removed again, the previous files and
// env file are put back, and removing the profile later leaves no secret file behind.
func TestFailedMaterialWriteLeavesNoSecret(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	d1, d2 := "sha256:"+strings.Repeat("1", 64), "sha256:"+strings.Repeat("2", 64)
	f.mustApply(withMaterial(instance("core", r1), "env-secret-1", "file-secret-1", d1))
	gw := filepath.Join(f.host.Root, "opt/agent/gateways/core")
	if err := os.Mkdir(filepath.Join(gw, "home/zz"), 0o700); err != nil {
		t.Fatal(err)
	}
	// Files are written in order: a-new and the new config/token go in before zz fails.
	next := withMaterial(instance("core", r1), "env-secret-2", "file-secret-2", d2)
	next.Files = append([]v1.MaterialFile{{Path: "a-new", Mode: 0o600, Data: []byte("new-secret-2")}}, next.Files...)
	next.Files = append(next.Files, v1.MaterialFile{Path: "zz", Mode: 0o600, Data: []byte("zz-secret-2")})
	_, err := f.applier.Apply(context.Background(), next)
	var failure *apply.Failure
	if !errors.As(err, &failure) || failure.Reason != "WriteFailed" {
		t.Fatalf("apply with a folder at a file's path: %v; want WriteFailed", err)
	}
	if _, err := os.Lstat(filepath.Join(gw, "home/a-new")); !os.IsNotExist(err) {
		t.Errorf("a file of the failed material is left: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(gw, "home/config/token")); string(b) != "file-secret-1" {
		t.Errorf("config/token after the failed write = %q; want the previous file", b)
	}
	if env, _ := os.ReadFile(filepath.Join(gw, "env")); !strings.Contains(string(env), d1) || strings.Contains(string(env), "secret-2") {
		t.Errorf("env file after the failed write:\n%s", env)
	}
	if err := f.applier.Remove(context.Background(), "core", false); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"home/a-new", "home/config/token", "home/.env"} {
		if _, err := os.Lstat(filepath.Join(gw, p)); !os.IsNotExist(err) {
			t.Errorf("%s is left after removal: %v", p, err)
		}
	}
}

// TestRollbackMaterialMatchesItsEnv: a rollback that must render the env file anew (the one
// from before is lost) keeps the new files with the new secret values it writes, so the gateway
// reads one material; a rollback to a drop-in of another isolation mode gives the restored
// files to that drop-in's user.
func TestRollbackMaterialMatchesItsEnv(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	broken := f.publish(agentruntime.Options{Version: "2.0.0-broken", CrashAtStart: true})
	d1, d2, d3 := "sha256:"+strings.Repeat("1", 64), "sha256:"+strings.Repeat("2", 64), "sha256:"+strings.Repeat("3", 64)
	gw := filepath.Join(f.host.Root, "opt/agent/gateways/core")
	read := func() (string, string) {
		t.Helper()
		st := f.status("core")
		return st.Read["env:TOKEN"], st.Read["file:config/token"]
	}
	rollback := func(in apply.Instance) {
		t.Helper()
		_, err := f.applier.Apply(context.Background(), in)
		var failure *apply.Failure
		if !errors.As(err, &failure) || !failure.RolledBack {
			t.Fatalf("apply of a broken release: %v; want a rollback", err)
		}
	}

	f.mustApply(withMaterial(instance("core", r1), "env-secret-1", "file-secret-1", d1))
	if err := os.Remove(filepath.Join(gw, "env")); err != nil {
		t.Fatal(err)
	}
	rollback(withMaterial(instance("core", broken), "env-secret-2", "file-secret-2", d2))
	if env, file := read(); env != sum("env-secret-2") || file != sum("file-secret-2") {
		t.Errorf("after a rollback with a re-rendered env file the gateway read env %s and file %s; want both of the new material (env %s, file %s)",
			env, file, sum("env-secret-2"), sum("file-secret-2"))
	}

	// A Convenience drop-in from before: its files go back to the shared user.
	conv := withMaterial(instance("core", r1), "env-secret-1", "file-secret-1", d1)
	conv.Isolation = v1.IsolationConvenience
	f.mustApply(conv)
	shared := f.status("core").UID
	rollback(withMaterial(instance("core", broken), "env-secret-3", "file-secret-3", d3))
	fi, err := os.Lstat(filepath.Join(gw, "home/config/token"))
	if err != nil {
		t.Fatal(err)
	}
	if uid := int(fi.Sys().(*syscall.Stat_t).Uid); uid != shared || f.status("core").UID != shared {
		t.Errorf("restored file owned by uid %d, gateway runs as %d; want the shared user's %d", uid, f.status("core").UID, shared)
	}
}
