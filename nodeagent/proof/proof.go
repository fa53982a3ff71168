// Package proof reads a running gateway from the host and checks it against what was intended:
// which release its main process imports, which user it runs as, whether its units set a
// PYTHONPATH behind the environment file's back, and which tools it loaded. Each check returns
// an error that says exactly what disagreed.
package proof

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/userfs"
)

// Process is what /proc says of one process.
type Process struct {
	PID     uint32
	Environ []string
	Exe     string
	Cwd     string
	UID     int
	// StartTime is the process's start in clock ticks since boot (/proc/<pid>/stat, field 22).
	StartTime int64
}

// ReadProcess reads a process from procRoot: "/proc" when the agent shares the host's PID
// namespace, or another host's /proc as the agent reaches it.
func ReadProcess(procRoot string, pid uint32) (*Process, error) {
	dir := filepath.Join(procRoot, strconv.FormatUint(uint64(pid), 10))
	environ, err := os.ReadFile(filepath.Join(dir, "environ")) //nolint:gosec // /proc/<pid>/ of a numeric pid
	if err != nil {
		return nil, fmt.Errorf("read environment of pid %d: %w", pid, err)
	}
	exe, err := os.Readlink(filepath.Join(dir, "exe"))
	if err != nil {
		return nil, fmt.Errorf("read exe of pid %d: %w", pid, err)
	}
	cwd, err := os.Readlink(filepath.Join(dir, "cwd"))
	if err != nil {
		return nil, fmt.Errorf("read cwd of pid %d: %w", pid, err)
	}
	status, err := os.ReadFile(filepath.Join(dir, "status")) //nolint:gosec // /proc/<pid>/ of a numeric pid
	if err != nil {
		return nil, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	start, err := StartTime(procRoot, pid)
	if err != nil {
		return nil, err
	}
	uid := -1
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				uid, _ = strconv.Atoi(f[0])
			}
		}
	}
	var env []string
	for _, kv := range bytes.Split(environ, []byte{0}) {
		if len(kv) > 0 {
			env = append(env, string(kv))
		}
	}
	return &Process{PID: pid, Environ: env, Exe: exe, Cwd: cwd, UID: uid, StartTime: start}, nil
}

// StartTime reads a process's start time in clock ticks since boot. The kernel writes it; the
// process cannot change it, so PID and start time together name one process.
func StartTime(procRoot string, pid uint32) (int64, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.FormatUint(uint64(pid), 10), "stat")) //nolint:gosec // /proc/<pid>/ of a numeric pid
	if err != nil {
		return 0, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold anything: the fields follow the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat of pid %d: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("stat of pid %d: %d fields", pid, len(f))
	}
	return strconv.ParseInt(f[19], 10, 64) // field 22 of the whole line
}

// Lookup returns every value of name in the process's environment.
func (p *Process) Lookup(name string) []string {
	var vals []string
	for _, kv := range p.Environ {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			vals = append(vals, v)
		}
	}
	return vals
}

// Expect is what a gateway process must show.
type Expect struct {
	Profile layout.Profile
	// ReleaseDir is the intended release folder inside the host.
	ReleaseDir string
	SHA256     string
	// Env are the assignments of the profile's environment file, all of which the process must
	// carry with the same values (so a process started from an older env file is caught).
	Env map[string]string
	// Python is the interpreter the process must run (AGENT_PYTHON); links are followed inside
	// the process's own root.
	Python string
	// UID the process must run as, or -1 for any.
	UID int
}

// Alignment checks that a process runs the intended release. procRoot is where the process's
// /proc entry was read from.
func Alignment(host layout.Host, procRoot string, p *Process, e Expect) error {
	pp := p.Lookup(unit.EnvPythonPath)
	if len(pp) != 1 {
		return fmt.Errorf("pid %d has %d PYTHONPATH entries, want exactly 1", p.PID, len(pp))
	}
	if pp[0] != e.Profile.Current {
		return fmt.Errorf("pid %d has PYTHONPATH=%s, want the profile's own %s", p.PID, pp[0], e.Profile.Current)
	}
	resolved, err := Resolve(host, pp[0])
	if err != nil {
		return fmt.Errorf("pid %d: PYTHONPATH %s: %w", p.PID, pp[0], err)
	}
	if resolved != e.ReleaseDir {
		return fmt.Errorf("pid %d: PYTHONPATH resolves to %s, want %s", p.PID, resolved, e.ReleaseDir)
	}
	if got := p.Lookup(unit.EnvReleaseSHA); len(got) != 1 || got[0] != e.SHA256 {
		return fmt.Errorf("pid %d declares release sha256 %v, want %s", p.PID, got, e.SHA256)
	}
	if !samePath(host, p.Cwd, e.ReleaseDir) {
		return fmt.Errorf("pid %d runs in %s, want the release folder %s", p.PID, p.Cwd, e.ReleaseDir)
	}
	if e.Python != "" {
		own := layout.Host{Root: filepath.Join(procRoot, strconv.FormatUint(uint64(p.PID), 10), "root")}
		python, err := Resolve(own, e.Python)
		if err != nil {
			return fmt.Errorf("pid %d: interpreter %s: %w", p.PID, e.Python, err)
		}
		if !samePath(host, p.Exe, python) {
			return fmt.Errorf("pid %d executes %s, want %s (%s)", p.PID, p.Exe, python, e.Python)
		}
	}
	for k, v := range e.Env {
		if got := p.Lookup(k); len(got) != 1 || got[0] != v {
			// Values are never named: they may be secrets, and this message goes into status.
			return fmt.Errorf("pid %d has %d value(s) of %s, not the one of its environment file: it was started from an older environment file", p.PID, len(got), k)
		}
	}
	if e.UID >= 0 && p.UID != e.UID {
		return fmt.Errorf("pid %d runs as uid %d, want %d", p.PID, p.UID, e.UID)
	}
	return nil
}

// samePath compares a path the kernel reported for a process with a path inside the host. The
// kernel shows paths relative to the reader's root when it can, so the agent may see either
// form depending on where it runs.
func samePath(host layout.Host, reported, inside string) bool {
	return reported == inside || reported == host.On(inside)
}

// Resolve follows symlinks of a path inside the host, under the agent's root prefix, and
// returns the result as a path inside the host. Links are resolved against the host's root,
// never the agent's, one component at a time.
func Resolve(host layout.Host, inside string) (string, error) {
	resolved := "/"
	rest := strings.Split(path.Clean("/"+inside), "/")
	for hops := 0; len(rest) > 0; {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			resolved = path.Dir(resolved)
			continue
		}
		next := path.Join(resolved, c)
		target, err := os.Readlink(host.On(next))
		if errors.Is(err, syscall.EINVAL) { // not a link
			resolved = next
			continue
		}
		if err != nil {
			return "", err
		}
		if hops++; hops > 40 {
			return "", fmt.Errorf("%s: too many levels of symbolic links", inside)
		}
		if path.IsAbs(target) {
			resolved = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return resolved, nil
}

// DropInFiles lists the drop-in files on disk that apply, or will apply after the next
// daemon-reload, to a template instance: what `systemctl cat` reads, whether or not systemd has
// loaded them yet.
func DropInFiles(host layout.Host, unitName string) []string {
	template := unitName
	if at := strings.Index(unitName, "@"); at >= 0 {
		template = unitName[:at+1] + unitName[strings.LastIndex(unitName, "."):]
	}
	var files []string
	for _, base := range []string{"/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"} {
		for _, d := range []string{unitName + ".d", template + ".d", "service.d"} {
			dir := path.Join(base, d)
			entries, err := os.ReadDir(host.On(dir))
			if err != nil {
				continue
			}
			for _, e := range entries {
				if strings.HasSuffix(e.Name(), ".conf") {
					files = append(files, path.Join(dir, e.Name()))
				}
			}
		}
	}
	return files
}

// UnitClean checks that none of a unit's files (fragment and drop-ins, paths inside the host)
// and none of the Environment= assignments systemd holds set PYTHONPATH.
func UnitClean(host layout.Host, files, environment []string) error {
	for _, f := range files {
		b, err := os.ReadFile(host.On(f))
		if err != nil {
			return fmt.Errorf("read unit file %s: %w", f, err)
		}
		if unit.SetsPythonPath(string(b)) {
			return fmt.Errorf("unit file %s mentions PYTHONPATH: only the profile's environment file may set it", f)
		}
	}
	for _, kv := range environment {
		if strings.HasPrefix(kv, unit.EnvPythonPath+"=") {
			return fmt.Errorf("the unit's Environment= sets %s", kv)
		}
	}
	return nil
}

// Siblings checks that no other instance's main process changed between two snapshots taken
// around a restart of self.
func Siblings(self string, before, after map[string]uint32) error {
	for name, pid := range before {
		if name == self {
			continue
		}
		if now, ok := after[name]; !ok || now != pid {
			return fmt.Errorf("sibling %s changed main PID %d -> %d during the restart of %s", name, pid, now, self)
		}
	}
	return nil
}

// GatewayStatus is what a gateway reports on its status endpoint.
type GatewayStatus struct {
	PID        int      `json:"pid"`
	Profile    string   `json:"profile"`
	ReleaseSHA string   `json:"release_sha"`
	PythonPath string   `json:"pythonpath"`
	Tools      []string `json:"tools"`
	// SysPath is the runtime's import path (Python's sys.path).
	SysPath []string `json:"sys_path"`
}

// StatusReply is a gateway's answer on its status socket and who gave it.
type StatusReply struct {
	Status GatewayStatus
	Raw    []byte
	// PeerPID and PeerUID are the process that created the listening socket, as the kernel
	// recorded it (SO_PEERCRED) in the agent's own PID namespace: facts the gateway cannot forge.
	PeerPID int32
	PeerUID uint32
}

// StatusTimeout bounds one request to a gateway's status endpoint, connect to last byte: a
// gateway that accepts and never answers costs the agent this much per request, no more.
const StatusTimeout = 2 * time.Second

// maxStatus is the most a status answer may hold.
const maxStatus = 1 << 20

// ReadStatus asks a profile's gateway for GET /status on $AGENT_HOME/run/status.sock. The
// profile's user owns everything under its home, so the socket is opened beneath the profile's
// root-owned folder without following any symlink, and connected to through that handle.
func ReadStatus(ctx context.Context, host layout.Host, p layout.Profile) (*StatusReply, error) {
	dir, err := userfs.OpenDir(host.On(p.Dir))
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	rel := strings.TrimPrefix(strings.TrimPrefix(p.StatusSocket, p.Dir), "/")
	sock, err := userfs.OpenBeneath(dir, rel)
	if err != nil {
		return nil, err
	}
	defer sock.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(sock.Fd()), &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("%s is not a socket", p.StatusSocket)
	}
	return readStatus(ctx, fmt.Sprintf("/proc/self/fd/%d", sock.Fd()))
}

// ReadStatusSocket asks for GET /status on a unix socket at a path the caller trusts.
func ReadStatusSocket(ctx context.Context, socket string) (*StatusReply, error) {
	return readStatus(ctx, socket)
}

func readStatus(ctx context.Context, address string) (*StatusReply, error) {
	ctx, cancel := context.WithTimeout(ctx, StatusTimeout)
	defer cancel()
	conn, err := DialUnix(ctx, address)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	reply := &StatusReply{}
	if uc, ok := conn.(*net.UnixConn); ok {
		raw, err := uc.SyscallConn()
		if err != nil {
			return nil, err
		}
		var cred *unix.Ucred
		var credErr error
		if err := raw.Control(func(fd uintptr) {
			cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		}); err != nil {
			return nil, err
		}
		if credErr != nil {
			return nil, fmt.Errorf("peer credentials: %w", credErr)
		}
		reply.PeerPID, reply.PeerUID = cred.Pid, cred.Uid
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://gateway/status", nil)
	if err != nil {
		return nil, err
	}
	req.Close = true
	if err := req.Write(conn); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(io.LimitReader(conn, maxStatus+64<<10)), req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxStatus+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxStatus {
		return nil, fmt.Errorf("status answer larger than %d bytes", maxStatus)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status endpoint answered %s", resp.Status)
	}
	if err := json.Unmarshal(body, &reply.Status); err != nil {
		return nil, fmt.Errorf("status endpoint: %w", err)
	}
	reply.Raw = body
	return reply, nil
}

// DialUnix connects to a unix socket. A socket address holds at most 107 bytes, and a host's
// root prefix can make the path longer: then the socket is reached through an open handle on its
// folder.
func DialUnix(ctx context.Context, socket string) (net.Conn, error) {
	var d net.Dialer
	if len(socket) < 100 {
		return d.DialContext(ctx, "unix", socket)
	}
	dir, err := os.OpenFile(filepath.Dir(socket), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	return d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(socket)))
}

// InControlGroup checks that a process (read from procRoot) belongs to a unit's control group.
// The unit's path is as its systemd reports it, which may be relative to a cgroup namespace the
// agent sees from outside: the process's path must equal it or end with it.
func InControlGroup(procRoot string, pid int64, unitCgroup string) error {
	if !strings.HasPrefix(unitCgroup, "/") || unitCgroup == "/" {
		return fmt.Errorf("the unit has no control group of its own")
	}
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.FormatInt(pid, 10), "cgroup")) //nolint:gosec // /proc/<pid>/ of a numeric pid
	if err != nil {
		return fmt.Errorf("control group of pid %d: %w", pid, err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			// unitCgroup starts with "/", so a suffix match ends on a path boundary.
			if strings.HasSuffix(rest, unitCgroup) {
				return nil
			}
			return fmt.Errorf("pid %d is in control group %s, not the unit's %s", pid, rest, unitCgroup)
		}
	}
	return fmt.Errorf("pid %d has no unified control group", pid)
}

// ImportPath checks a gateway's reported import path: every entry must lie in its release
// (through `current` or the folder it resolves to) or in the interpreter's own library under
// /usr, which the gateway cannot write. An entry in a folder the gateway can write (its home,
// /tmp, a relative path) would let it import code of its own choosing.
func ImportPath(sysPath []string, current, releaseDir string) error {
	if len(sysPath) == 0 {
		return fmt.Errorf("the status endpoint reports no sys_path")
	}
	for _, e := range sysPath {
		c := path.Clean(e)
		ok := path.IsAbs(e) && (within(c, current) || within(c, releaseDir) || within(c, "/usr"))
		if !ok {
			return fmt.Errorf("the gateway imports from %q, which is neither its release nor the interpreter's library", e)
		}
	}
	return nil
}

func within(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// Status checks a gateway's own report against the process systemd knows and the intent.
func Status(st *GatewayStatus, mainPID uint32, profile, sha string, denied []string) error {
	if st.PID != int(mainPID) {
		return fmt.Errorf("status endpoint answered from pid %d, but the unit's main PID is %d", st.PID, mainPID)
	}
	if st.Profile != profile || st.ReleaseSHA != sha {
		return fmt.Errorf("status endpoint reports profile %q release %s, want %q %s", st.Profile, st.ReleaseSHA, profile, sha)
	}
	deny := map[string]bool{}
	for _, d := range denied {
		deny[d] = true
	}
	for _, t := range st.Tools {
		if deny[t] {
			return fmt.Errorf("denied tool %q is loaded", t)
		}
	}
	return nil
}
