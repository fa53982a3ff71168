package users

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// These tests run the host's real useradd against a passwd database under a root prefix, the
// way the agent drives a host from a container.

func newRoot(t *testing.T) Manager {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("useradd --prefix needs root")
	}
	root := t.TempDir()
	files := map[string]string{
		"etc/passwd":  "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
		"etc/group":   "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n",
		"etc/shadow":  "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
		"etc/gshadow": "root:*::\ndaemon:*::\nnogroup:*::\n",
		// Debian's settings that matter here: userdel removes a user's own group with it.
		"etc/login.defs": "UID_MIN 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\nUSERGROUPS_ENAB yes\n",
	}
	for name, text := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Manager{Root: root}
}

// useradd makes a user the way an administrator or a package would: not through the agent.
func useradd(t *testing.T, m Manager, args ...string) {
	t.Helper()
	out, err := exec.Command("useradd", append([]string{"--prefix", m.Root, "--system", "--no-create-home"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("useradd %v: %v %s", args, err, out)
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustConflict(t *testing.T, u *User, err error, want string) {
	t.Helper()
	var c *ConflictError
	if !errors.As(err, &c) {
		t.Fatalf("got user %+v, error %v; want a ConflictError", u, err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
}

func TestEnsureCreatesAndReusesItsOwnUser(t *testing.T) {
	m := newRoot(t)
	u, err := m.Ensure("agent-core", RoleProfile)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := m.Lookup("agent-core"); got == nil || *got != *u {
		t.Fatalf("passwd has %+v, Ensure returned %+v", got, u)
	}
	fi, err := os.Lstat(m.registryPath())
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 || st.Uid != 0 {
		t.Errorf("registry is %v owned by %d, want a 0600 file of root's", fi.Mode(), st.Uid)
	}
	passwd := readFile(t, filepath.Join(m.Root, "etc/passwd"))

	again, err := m.Ensure("agent-core", RoleProfile)
	if err != nil || *again != *u {
		t.Fatalf("second Ensure: %+v %v, want %+v", again, err, u)
	}
	// A new agent process reads the same registry.
	fresh, err := Manager{Root: m.Root}.Ensure("agent-core", RoleProfile)
	if err != nil || *fresh != *u {
		t.Fatalf("Ensure by a new manager: %+v %v, want %+v", fresh, err, u)
	}
	if !bytes.Equal(passwd, readFile(t, filepath.Join(m.Root, "etc/passwd"))) {
		t.Error("reusing the user changed /etc/passwd")
	}
}

func TestEnsureNeverAdoptsAUserItDidNotCreate(t *testing.T) {
	for _, tc := range []struct{ name, comment string }{
		{"agent-foo", "someone else's service"},
		// The comment an agent writes is no proof: chfn or an administrator can set it.
		{"agent-bar", "agent gateway"},
		{"agent", "a person called agent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newRoot(t)
			useradd(t, m, "--comment", tc.comment, tc.name)
			passwd := readFile(t, filepath.Join(m.Root, "etc/passwd"))

			u, err := m.Ensure(tc.name, RoleProfile)
			mustConflict(t, u, err, "exists but was not created by the agent")
			if !bytes.Equal(passwd, readFile(t, filepath.Join(m.Root, "etc/passwd"))) {
				t.Error("the refused Ensure changed /etc/passwd")
			}
			if _, err := os.Lstat(m.registryPath()); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the refused Ensure wrote the registry: %v", err)
			}
			// Asking again does not wear the refusal down.
			u, err = m.Ensure(tc.name, RoleShared)
			mustConflict(t, u, err, "exists but was not created by the agent")
		})
	}
}

func TestEnsureRefusesARegistryThatDisagreesWithPasswd(t *testing.T) {
	m := newRoot(t)
	u, err := m.Ensure("agent-core", RoleProfile)
	if err != nil {
		t.Fatal(err)
	}
	// The registry names the user with another uid (edited, or the user was replaced).
	var reg registry
	if err := json.Unmarshal(readFile(t, m.registryPath()), &reg); err != nil {
		t.Fatal(err)
	}
	reg.find("agent-core").UID = u.UID + 1
	if err := m.save(&reg); err != nil {
		t.Fatal(err)
	}
	got, err := m.Ensure("agent-core", RoleProfile)
	mustConflict(t, got, err, "the agent created it with uid")

	// The same after the user was removed and someone else created one of that name.
	reg.find("agent-core").UID = u.UID
	if err := m.save(&reg); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("userdel", "--prefix", m.Root, "agent-core").CombinedOutput(); err != nil {
		t.Fatalf("userdel: %v %s", err, out)
	}
	useradd(t, m, "--uid", "4242", "--user-group", "agent-core")
	got, err = m.Ensure("agent-core", RoleProfile)
	mustConflict(t, got, err, "it has uid 4242")
}

func TestEnsureKeepsRolesApart(t *testing.T) {
	m := newRoot(t)
	qemu, err := m.Ensure("agent-vmm", RoleMicroVM)
	if err != nil {
		t.Fatal(err)
	}
	u, err := m.Ensure("agent-vmm", RoleProfile)
	mustConflict(t, u, err, "the agent created it for microvm, not for profile")
	if again, err := m.Ensure("agent-vmm", RoleMicroVM); err != nil || *again != *qemu {
		t.Errorf("the microVM user after a refused profile: %+v %v", again, err)
	}
}

func TestEnsureRefusesARegistryOthersCanWrite(t *testing.T) {
	m := newRoot(t)
	if _, err := m.Ensure("agent-core", RoleProfile); err != nil {
		t.Fatal(err)
	}
	path := m.registryPath()
	for _, tc := range []struct {
		name  string
		spoil func() error
		want  string
	}{
		{"group-writable", func() error { return os.Chmod(path, 0o620) }, "mode 0600"},
		{"not root's", func() error { return os.Chown(path, 1000, 0) }, "owned by root"},
		{"a link", func() error {
			real := path + ".real"
			if err := os.Rename(path, real); err != nil {
				return err
			}
			return os.Symlink(real, path)
		}, "symbolic links"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			saved := readFile(t, path)
			t.Cleanup(func() {
				_ = os.Remove(path + ".real")
				_ = os.Remove(path)
				if err := os.WriteFile(path, saved, 0o600); err != nil {
					t.Fatal(err)
				}
			})
			if err := tc.spoil(); err != nil {
				t.Fatal(err)
			}
			u, err := m.Ensure("agent-core", RoleProfile)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Ensure with a %s registry: %+v %v, want an error saying %q", tc.name, u, err, tc.want)
			}
			if _, err := m.Ensure("agent-new", RoleProfile); err == nil {
				t.Errorf("created a user while the registry was %s", tc.name)
			}
			if u, _ := m.Lookup("agent-new"); u != nil {
				t.Errorf("agent-new was created while the registry was %s", tc.name)
			}
		})
	}
	if _, err := m.Ensure("agent-core", RoleProfile); err != nil {
		t.Errorf("after the registry was put back: %v", err)
	}
}

// TestEnsureFinishesACreationCutShort: the agent records its intent, runs useradd and records
// the result; killed in between, the next Ensure recognizes its own user by the mark it chose,
// and nobody else's.
func TestEnsureFinishesACreationCutShort(t *testing.T) {
	m := newRoot(t)
	reg := &registry{Users: []record{
		{Name: "agent-ours", Role: RoleProfile, Pending: "0123456789abcdef"},
		{Name: "agent-theirs", Role: RoleProfile, Pending: "fedcba9876543210"},
		{Name: "agent-never", Role: RoleProfile, Pending: "00112233445566ff"},
	}}
	if err := m.save(reg); err != nil {
		t.Fatal(err)
	}
	useradd(t, m, "--user-group", "--comment", mark("0123456789abcdef"), "agent-ours")
	useradd(t, m, "--user-group", "--comment", "agent gateway", "agent-theirs")

	ours, err := m.Ensure("agent-ours", RoleProfile)
	if err != nil {
		t.Fatalf("a user whose creation was cut short: %v", err)
	}
	theirs, err := m.Ensure("agent-theirs", RoleProfile)
	mustConflict(t, theirs, err, "not created by the agent")
	never, err := m.Ensure("agent-never", RoleProfile)
	if err != nil {
		t.Fatalf("a user whose useradd never ran: %v", err)
	}

	var got registry
	if err := json.Unmarshal(readFile(t, m.registryPath()), &got); err != nil {
		t.Fatal(err)
	}
	for _, u := range []*User{ours, never} {
		if r := got.find(u.Name); r == nil || r.Pending != "" || r.UID != u.UID || r.GID != u.GID {
			t.Errorf("registry entry of %s: %+v, want uid %d gid %d", u.Name, r, u.UID, u.GID)
		}
	}
}

func TestEnsureCreatesAgainAUserRemovedSince(t *testing.T) {
	m := newRoot(t)
	if _, err := m.Ensure("agent-core", RoleProfile); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("userdel", "--prefix", m.Root, "agent-core").CombinedOutput(); err != nil {
		t.Fatalf("userdel: %v %s", err, out)
	}
	u, err := m.Ensure("agent-core", RoleProfile)
	if err != nil || u == nil {
		t.Fatalf("Ensure after userdel: %+v %v", u, err)
	}
	if again, err := (Manager{Root: m.Root}).Ensure("agent-core", RoleProfile); err != nil || *again != *u {
		t.Errorf("the re-created user is not recorded: %+v %v, want %+v", again, err, u)
	}
}

func TestEnsureConcurrentCallsCreateOneUser(t *testing.T) {
	m := newRoot(t)
	var wg sync.WaitGroup
	got := make([]*User, 8)
	errs := make([]error, len(got))
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = Manager{Root: m.Root}.Ensure("agent-shared-run", RoleShared)
		}()
	}
	wg.Wait()
	for i := range got {
		if errs[i] != nil || *got[i] != *got[0] {
			t.Fatalf("call %d: %+v %v, want %+v", i, got[i], errs[i], got[0])
		}
	}
	if n := strings.Count(string(readFile(t, filepath.Join(m.Root, "etc/passwd"))), "agent-shared-run:"); n != 1 {
		t.Errorf("passwd has %d entries for agent-shared-run", n)
	}
}
