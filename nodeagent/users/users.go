// Package users creates the system users gateways and QEMU run as: `agent-<profile>` per profile
// in Production isolation, one shared user in Convenience mode, and the microVM user. Users are
// created with the host's useradd under the agent's root prefix, idempotently, and recorded in a
// registry only root can write (layout.UsersRegistry). The agent uses no other account: a user of
// the same name that someone else made is refused, never adopted.
package users

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/google/renameio/v2"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// Role is what the agent created a user for. A user serves only the role it was created for, so
// a profile can never run as the QEMU user or the other way round, whatever the names.
type Role string

// The roles of the agent's users.
const (
	// RoleProfile is one profile's Production user, agent-<profile>.
	RoleProfile Role = "profile"
	// RoleShared is the user every Convenience-mode profile shares.
	RoleShared Role = "shared"
	// RoleMicroVM is the user QEMU runs tool-run microVMs as.
	RoleMicroVM Role = "microvm"
)

// Manager creates users in the passwd database under Root ("/" on a real host) and keeps the
// registry of the users it created.
type Manager struct {
	Root string
	// HostTools runs the host's useradd chrooted into Root (see layout.Host.Command).
	HostTools bool
}

// User is one system user.
type User struct {
	Name     string
	UID, GID int
}

// ConflictError is a user name the agent may not use: the user exists but the agent did not
// create it, was created for another role, or no longer matches what the agent recorded.
type ConflictError struct {
	Name   string
	Reason string
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("user %s: %s; the agent runs gateways and QEMU only as users it created itself (listed in %s)",
		e.Name, e.Reason, layout.UsersRegistry)
}

// registry is the file layout.UsersRegistry.
type registry struct {
	Users []record `json:"users"`
}

type record struct {
	Name string `json:"name"`
	Role Role   `json:"role"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	// Pending is set from just before useradd until its result is recorded: a random mark that
	// useradd writes into the new user's comment, so that a user found after a crash in between
	// is recognized as the agent's own. The registry is root's and 0600, so nobody else knows it.
	Pending string `json:"pending,omitempty"`
}

func (r *registry) find(name string) *record {
	for i := range r.Users {
		if r.Users[i].Name == name {
			return &r.Users[i]
		}
	}
	return nil
}

func (r *registry) put(rec record) {
	if old := r.find(rec.Name); old != nil {
		*old = rec
		return
	}
	r.Users = append(r.Users, rec)
}

// maxRegistrySize bounds what is read; a registry of thousands of users is far below it.
const maxRegistrySize = 1 << 20

// mu serializes read-modify-write of registries: one agent process drives a host (the host lock),
// but instances and the microVM path may ask for users at the same time.
var mu sync.Mutex

// commentPrefix starts the passwd comment of every user the agent creates.
const commentPrefix = "agent gateway"

func mark(token string) string { return commentPrefix + " " + token }

// entry is one passwd line.
type entry struct {
	User
	Comment string
}

// Lookup finds a user in Root's /etc/passwd; nil when there is none.
func (m Manager) Lookup(name string) (*User, error) {
	e, err := m.lookup(name)
	if e == nil {
		return nil, err
	}
	return &e.User, err
}

func (m Manager) lookup(name string) (*entry, error) {
	f, err := os.Open(filepath.Join(m.Root, "etc/passwd"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 5 || fields[0] != name {
			continue
		}
		uid, err1 := strconv.Atoi(fields[2])
		gid, err2 := strconv.Atoi(fields[3])
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("passwd entry of %s: %w", name, err)
		}
		return &entry{User: User{Name: name, UID: uid, GID: gid}, Comment: fields[4]}, nil
	}
	return nil, sc.Err()
}

// Ensure returns the system user name for role, creating it (with a group of the same name, no
// home folder and no login shell) if it does not exist. It returns a *ConflictError, and changes
// nothing, when a user of that name exists that the agent did not create for role, or whose uid or
// gid differs from what the agent recorded when it created it. A user the agent created and that
// was removed since is created again.
func (m Manager) Ensure(name string, role Role) (*User, error) {
	mu.Lock()
	defer mu.Unlock()
	reg, err := m.load()
	if err != nil {
		return nil, err
	}
	e, err := m.lookup(name)
	if err != nil {
		return nil, err
	}
	rec := reg.find(name)
	if rec != nil && rec.Role != role {
		return nil, &ConflictError{Name: name, Reason: fmt.Sprintf("the agent created it for %s, not for %s", rec.Role, role)}
	}
	switch {
	case rec != nil && rec.Pending != "" && e != nil:
		// The agent stopped between useradd and recording its result; the mark tells whether
		// this user is the one it was creating.
		if e.Comment != mark(rec.Pending) {
			return nil, &ConflictError{Name: name, Reason: "it exists but was not created by the agent"}
		}
		return m.record(reg, role, e)
	case rec != nil && rec.Pending == "" && e != nil:
		if e.UID != rec.UID || e.GID != rec.GID {
			return nil, &ConflictError{Name: name, Reason: fmt.Sprintf("it has uid %d and gid %d, but the agent created it with uid %d and gid %d",
				e.UID, e.GID, rec.UID, rec.GID)}
		}
		return &e.User, nil
	case rec == nil && e != nil:
		return nil, &ConflictError{Name: name, Reason: "it exists but was not created by the agent"}
	}
	return m.create(reg, name, role)
}

// create runs useradd for a user that does not exist, recording the intent first.
func (m Manager) create(reg *registry, name string, role Role) (*User, error) {
	token := make([]byte, 8)
	if _, err := rand.Read(token); err != nil {
		return nil, err
	}
	pending := hex.EncodeToString(token)
	reg.put(record{Name: name, Role: role, Pending: pending})
	if err := m.save(reg); err != nil {
		return nil, err
	}
	args := []string{"--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
		"--shell", "/usr/sbin/nologin", "--comment", mark(pending)}
	host := layout.Host{Root: m.Root, HostTools: m.HostTools}
	if r := host.ToolRoot(); r != "" && r != "/" {
		args = append(args, "--prefix", r)
	}
	// A fixed binary, no shell, and "--" before the name.
	out, err := host.Command(context.Background(), layout.UserAdd, append(args, "--", name)...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("useradd %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	e, err := m.lookup(name)
	switch {
	case err != nil:
		return nil, err
	case e == nil:
		return nil, fmt.Errorf("useradd %s succeeded but the user is not in %s/etc/passwd", name, m.Root)
	case e.Comment != mark(pending):
		return nil, &ConflictError{Name: name, Reason: "another user of that name appeared while the agent created it"}
	}
	return m.record(reg, role, e)
}

// record notes a user the agent created, with the uid and gid it got.
func (m Manager) record(reg *registry, role Role, e *entry) (*User, error) {
	reg.put(record{Name: e.Name, Role: role, UID: e.UID, GID: e.GID})
	if err := m.save(reg); err != nil {
		return nil, err
	}
	return &e.User, nil
}

func (m Manager) registryPath() string {
	return layout.Host{Root: m.Root}.On(layout.UsersRegistry)
}

// load reads the registry; none yet is an empty one. A registry that is not a regular file of
// root's, writable and readable by root alone, is refused: anyone else could add users to it.
func (m Manager) load() (*registry, error) {
	path := m.registryPath()
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0) //nolint:gosec // the agent's own file; a link or a FIFO is refused below
	if errors.Is(err, fs.ErrNotExist) {
		return &registry{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("user registry: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("user registry: %w", err)
	}
	owner := -1
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		owner = int(st.Uid)
	}
	if !fi.Mode().IsRegular() || owner != 0 || fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("user registry %s must be a regular file owned by root with mode 0600 (it is %v, owner %d)",
			path, fi.Mode(), owner)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxRegistrySize+1))
	if err != nil {
		return nil, fmt.Errorf("user registry: %w", err)
	}
	if len(b) > maxRegistrySize {
		return nil, fmt.Errorf("user registry %s is larger than %d bytes", path, maxRegistrySize)
	}
	var reg registry
	if err := json.Unmarshal(b, &reg); err != nil {
		return nil, fmt.Errorf("user registry %s: %w", path, err)
	}
	return &reg, nil
}

// save writes the registry atomically (temp file, fsync, rename).
func (m Manager) save(reg *registry) error {
	path := m.registryPath()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil { //nolint:gosec // /opt/agent is read by every gateway (DESIGN host layout)
		return err
	}
	b, err := json.MarshalIndent(reg, "", "  ")
	if err != nil {
		return err
	}
	return renameio.WriteFile(path, append(b, '\n'), 0o600)
}
