// Package users creates the system users gateways run as: `agent-<profile>` per profile in
// Production isolation, one shared user in Convenience mode. Users are created with the host's
// useradd under the agent's root prefix, idempotently.
package users

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// Manager creates users in the passwd database under Root ("/" on a real host).
type Manager struct {
	Root string
}

// User is one system user.
type User struct {
	Name     string
	UID, GID int
}

// Lookup finds a user in Root's /etc/passwd.
func (m Manager) Lookup(name string) (*User, error) {
	f, err := os.Open(filepath.Join(m.Root, "etc/passwd"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 4 || fields[0] != name {
			continue
		}
		uid, err1 := strconv.Atoi(fields[2])
		gid, err2 := strconv.Atoi(fields[3])
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("passwd entry of %s: %w", name, err)
		}
		return &User{Name: name, UID: uid, GID: gid}, nil
	}
	return nil, sc.Err()
}

// Ensure returns the system user name, creating it (with a group of the same name, no home
// folder and no login shell) if it does not exist.
func (m Manager) Ensure(name string) (*User, error) {
	if u, err := m.Lookup(name); err != nil || u != nil {
		return u, err
	}
	args := []string{"--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
		"--shell", "/usr/sbin/nologin", "--comment", "agent gateway"}
	if m.Root != "" && m.Root != "/" {
		args = append(args, "--prefix", m.Root)
	}
	out, err := exec.Command("useradd", append(args, name)...).CombinedOutput() //nolint:gosec // a fixed binary; the name is validated, and no shell is involved
	if err != nil {
		return nil, fmt.Errorf("useradd %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	u, err := m.Lookup(name)
	if err == nil && u == nil {
		err = fmt.Errorf("useradd %s succeeded but the user is not in %s/etc/passwd", name, m.Root)
	}
	return u, err
}
