package microvm_test

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/go-logr/logr/testr"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
)

// Two profile users, as the agent would create them.
var (
	alice = microvm.Owner{UID: 64601, GID: 64601}
	bob   = microvm.Owner{UID: 64602, GID: 64602}
)

// profileHomes makes two homes the way the agent does (0700, owned by the profile's user)
// under a root-owned folder every user may traverse.
func profileHomes(t *testing.T) (root string, homes map[string]string) {
	t.Helper()
	root, err := os.MkdirTemp("/tmp", "gwsock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	homes = map[string]string{}
	for name, o := range map[string]microvm.Owner{"alice": alice, "bob": bob} {
		home := filepath.Join(root, name, "home")
		if err := os.Mkdir(filepath.Dir(home), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(home, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(home, o.UID, o.GID); err != nil {
			t.Fatal(err)
		}
		homes[name] = home
	}
	return root, homes
}

// toolRuns reads one series of the tool-run counter from the agent's metrics registry.
func toolRuns(profile string, phase microvm.Phase) float64 {
	families, _ := metrics.Registry.Gather()
	for _, f := range families {
		if f.GetName() != "gateway_agent_toolruns_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["profile"] == profile && labels["phase"] == string(phase) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func serveSockets(t *testing.T, r microvm.Executor) *microvm.Sockets {
	s := &microvm.Sockets{Executor: r, Log: testr.New(t)}
	t.Cleanup(s.Close)
	return s
}

// request sends one request over a socket as the given user, from a separate process (the
// peer's uid is what the kernel reports for that process). It returns the reply, or the
// connect error text.
func request(t *testing.T, as *microvm.Owner, socket string, req microvm.Request) (microvm.Result, string) {
	t.Helper()
	body, _ := json.Marshal(req)
	client := `
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect: " + e.strerror, file=sys.stderr)
    sys.exit(3)
s.sendall(sys.argv[2].encode())
s.shutdown(socket.SHUT_WR)
sys.stdout.write(s.makefile().read())
`
	cmd := exec.Command("/usr/bin/python3", "-c", client, socket, string(body))
	if as != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(as.UID), Gid: uint32(as.GID)}}
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 3 {
			return microvm.Result{}, strings.TrimSpace(stderr.String())
		}
		t.Fatalf("client: %v: %s", err, stderr.String())
	}
	var res microvm.Result
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("reply %q: %v", out, err)
	}
	return res, ""
}

func TestSocketServesOnlyItsProfilesUser(t *testing.T) {
	_, homes := profileHomes(t)
	s := serveSockets(t, microvmguest.Runner(t, microvm.Config{}))
	if err := s.Ensure("alice", homes["alice"], alice); err != nil {
		t.Fatal(err)
	}
	if err := s.Ensure("bob", homes["bob"], bob); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(homes["alice"], "run", microvm.SocketName)
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 || int(st.Uid) != alice.UID || int(st.Gid) != alice.GID {
		t.Fatalf("socket %s: mode %v uid %d gid %d, want a 0600 socket of %d", sock, fi.Mode(), st.Uid, st.Gid, alice.UID)
	}

	// The profile's own user gets a real run.
	res, connErr := request(t, &alice, sock, microvm.Request{Command: []string{"sh", "-c", "echo hello from the guest; exit 4"}})
	if connErr != "" || res.Phase != microvm.Failed || res.ExitCode != 4 || string(res.Stdout) != "hello from the guest\n" {
		t.Fatalf("alice on her socket: %+v %s", res, connErr)
	}

	if got := toolRuns("alice", microvm.Failed); got != 1 {
		t.Errorf("gateway_agent_toolruns_total{alice,Failed} = %v, want 1", got)
	}

	// Another profile's user cannot even connect: the home and the socket are alice's alone.
	if _, connErr := request(t, &bob, sock, microvm.Request{Command: []string{"true"}}); !strings.Contains(connErr, "Permission denied") {
		t.Fatalf("bob on alice's socket: connect error %q, want Permission denied", connErr)
	}
	// Whoever gets past the file modes (root here) is refused by the peer check, before any VM.
	res, connErr = request(t, nil, sock, microvm.Request{Command: []string{"true"}})
	if connErr != "" || res.Phase != microvm.Rejected || !strings.Contains(res.Message, "not the user of profile alice") {
		t.Fatalf("root on alice's socket: %+v %s", res, connErr)
	}
	if got := toolRuns("alice", microvm.Rejected); got != 1 {
		t.Errorf("gateway_agent_toolruns_total{alice,Rejected} = %v, want 1", got)
	}
	// Bob's own socket serves bob, not alice.
	res, _ = request(t, nil, filepath.Join(homes["bob"], "run", microvm.SocketName), microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Rejected {
		t.Fatalf("root on bob's socket: %+v", res)
	}

	// Remove takes the socket away.
	s.Remove("alice")
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket still there after Remove: %v", err)
	}
}

func TestSocketRefusesInvalidAndConcurrentRequests(t *testing.T) {
	_, homes := profileHomes(t)
	s := serveSockets(t, microvmguest.Runner(t, microvm.Config{}))
	if err := s.Ensure("alice", homes["alice"], alice); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(homes["alice"], "run", microvm.SocketName)
	if res, _ := request(t, &alice, sock, microvm.Request{}); res.Phase != microvm.Rejected || !strings.Contains(res.Message, "command is empty") {
		t.Fatalf("empty request: %+v", res)
	}

	// One run per profile at a time: a second request while the first runs is refused.
	first := make(chan microvm.Result)
	go func() {
		res, _ := request(t, &alice, sock, microvm.Request{Command: []string{"sleep", "2"}})
		first <- res
	}()
	time.Sleep(500 * time.Millisecond) // the first request is inside its VM's boot by now
	res, _ := request(t, &alice, sock, microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Rejected || !strings.Contains(res.Message, "in progress") {
		t.Fatalf("second concurrent request: %+v", res)
	}
	if res := <-first; res.Phase != microvm.Succeeded {
		t.Fatalf("first request: %+v", res)
	}
}

func TestSocketIsNeverCreatedThroughALink(t *testing.T) {
	root, homes := profileHomes(t)
	s := serveSockets(t, microvmguest.Runner(t, microvm.Config{}))
	elsewhere := filepath.Join(root, "elsewhere")
	if err := os.Mkdir(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}
	// The profile's user replaced its run folder by a link to somewhere else.
	if err := os.Symlink(elsewhere, filepath.Join(homes["alice"], "run")); err != nil {
		t.Fatal(err)
	}
	if err := s.Ensure("alice", homes["alice"], alice); err == nil {
		t.Fatal("Ensure followed a symlinked run folder")
	}
	if entries, _ := os.ReadDir(elsewhere); len(entries) != 0 {
		t.Fatalf("something was created through the link: %v", entries)
	}

	// A link planted where the socket goes is removed, never followed.
	victim := filepath.Join(root, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := filepath.Join(homes["bob"], "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(run, bob.UID, bob.GID); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(run, microvm.SocketName)); err != nil {
		t.Fatal(err)
	}
	if err := s.Ensure("bob", homes["bob"], bob); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(victim)
	if err != nil || fi.Mode().Perm() != 0o644 || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Fatalf("the link's target was changed: %v %v", fi, err)
	}
	if fi, err := os.Lstat(filepath.Join(run, microvm.SocketName)); err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("socket not in place of the link: %v %v", fi, err)
	}
}

// TestSocketKeepsServingAfterAcceptErrors: an accept that fails (here EMFILE, with the agent
// out of file descriptors) does not end the socket; the waiting client is served once the
// agent has descriptors again.
func TestSocketKeepsServingAfterAcceptErrors(t *testing.T) {
	_, homes := profileHomes(t)
	acceptErrors := make(chan string, 100)
	log := funcr.New(func(prefix, args string) {
		if strings.Contains(args, "accept") {
			select {
			case acceptErrors <- args:
			default:
			}
		}
	}, funcr.Options{})
	// No request gets as far as a VM here: root's is refused at the peer check.
	s := &microvm.Sockets{Log: log}
	t.Cleanup(s.Close)
	if err := s.Ensure("alice", homes["alice"], alice); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(homes["alice"], "run", microvm.SocketName)

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// From here on no new descriptor can be opened: the server's accept fails with EMFILE
	// while the connection waits in the backlog.
	var saved unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(restore)
	lowest := uint64(0)
	for ; ; lowest++ {
		if _, err := unix.FcntlInt(uintptr(lowest), unix.F_GETFD, 0); err == unix.EBADF {
			break
		}
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: lowest, Max: saved.Max}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: sock}); err != nil {
		restore()
		t.Fatal(err)
	}
	select {
	case msg := <-acceptErrors:
		t.Logf("the server saw: %s", msg)
	case <-time.After(10 * time.Second):
		restore()
		t.Fatal("the server's accept did not fail while the agent had no descriptor left")
	}
	restore()

	conn, err := net.FileConn(os.NewFile(uintptr(fd), "client"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if err := json.NewEncoder(conn).Encode(microvm.Request{Command: []string{"true"}}); err != nil {
		t.Fatal(err)
	}
	_ = conn.(*net.UnixConn).CloseWrite()
	var res microvm.Result
	if err := json.NewDecoder(conn).Decode(&res); err != nil {
		t.Fatalf("no reply after the accept errors: %v", err)
	}
	if res.Phase != microvm.Rejected || !strings.Contains(res.Message, "not the user of profile alice") {
		t.Fatalf("reply %+v, want root refused by the peer check", res)
	}
}
