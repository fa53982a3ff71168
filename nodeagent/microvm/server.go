package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
)

// SocketName is the request socket in a profile's $AGENT_HOME/run/, beside status.sock.
const SocketName = "toolrun.sock"

// requestReadTimeout bounds how long a client may take to send its request.
const requestReadTimeout = 10 * time.Second

// maxRequestBytes bounds one request on the wire: stdin in base64 plus the command.
const maxRequestBytes = MaxStdinBytes/3*4 + 4 + 2*MaxCommandBytes + 64<<10

// Executor runs one request on behalf of a profile; *Runner is the host-local one. The profile
// is the socket's, never a name the caller sent.
type Executor interface {
	Execute(ctx context.Context, profile string, req Request) (Result, error)
}

// Owner is the profile user a socket belongs to: the only peer it serves.
type Owner struct {
	UID, GID int
}

// Sockets serves one request socket per profile. The socket lives in the profile's home, is
// owned by the profile's user with mode 0600, and answers only a peer whose kernel-reported
// uid is that user: the file mode keeps other users out, the peer check refuses anyone who gets
// in some other way (root included).
type Sockets struct {
	Executor Executor
	// PerProfile is how many requests of one profile run at once (default 1); more are
	// refused, so one gateway cannot hold every VM slot of the host.
	PerProfile int
	Log        logr.Logger

	mu      sync.Mutex
	servers map[string]*server
	wg      sync.WaitGroup
}

type server struct {
	profile string
	owner   Owner
	runDir  *os.File // O_PATH handle of $AGENT_HOME/run
	ln      *net.UnixListener
	busy    chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc
}

// Ensure makes profile's socket serve owner, creating it in home/run (home is the path of the
// profile's $AGENT_HOME under the agent's root prefix). Calling it again with the same owner
// is a no-op while the socket is still in place.
func (s *Sockets) Ensure(profile, home string, owner Owner) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.servers == nil {
		s.servers = map[string]*server{}
	}
	if old, ok := s.servers[profile]; ok {
		if old.owner == owner && old.inPlace() {
			return nil
		}
		s.stopLocked(profile)
	}
	srv, err := s.listen(profile, home, owner)
	if err != nil {
		return fmt.Errorf("tool-run socket of %s: %w", profile, err)
	}
	s.servers[profile] = srv
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.serve(srv)
	}()
	return nil
}

// Remove stops serving profile and deletes its socket.
func (s *Sockets) Remove(profile string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked(profile)
}

// Close stops every socket and waits for running requests to end.
func (s *Sockets) Close() {
	s.mu.Lock()
	for p := range s.servers {
		s.stopLocked(p)
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Sockets) stopLocked(profile string) {
	srv, ok := s.servers[profile]
	if !ok {
		return
	}
	delete(s.servers, profile)
	srv.cancel()
	_ = srv.ln.Close()
	_ = unix.Unlinkat(int(srv.runDir.Fd()), SocketName, 0)
	_ = srv.runDir.Close()
}

// listen creates the socket without following anything the profile user controls: home's
// parent belongs to root, and everything below home is reached through handles opened with
// O_NOFOLLOW, so a symlink planted in home cannot redirect the agent's writes.
func (s *Sockets) listen(profile, home string, owner Owner) (*server, error) {
	homeFD, err := unix.Open(home, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open home: %w", err)
	}
	defer unix.Close(homeFD)
	switch err := unix.Mkdirat(homeFD, "run", 0o700); {
	case err == nil:
		if err := unix.Fchownat(homeFD, "run", owner.UID, owner.GID, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return nil, err
		}
	case !errors.Is(err, unix.EEXIST):
		return nil, fmt.Errorf("create run folder: %w", err)
	}
	runFD, err := unix.Openat(homeFD, "run", unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open run folder: %w", err)
	}
	runDir := os.NewFile(uintptr(runFD), home+"/run")
	ok := false
	defer func() {
		if !ok {
			runDir.Close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(runFD, &st); err != nil {
		return nil, err
	}
	if int(st.Uid) != owner.UID && st.Uid != 0 {
		return nil, fmt.Errorf("%s/run belongs to uid %d, not to the profile's user %d", home, st.Uid, owner.UID)
	}
	if err := unix.Unlinkat(runFD, SocketName, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("remove the old socket: %w", err)
	}
	// Through the handle's /proc path the address stays short, whatever the root prefix.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Net: "unix", Name: procFD(runFD) + "/" + SocketName})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	if err := secureSocket(runFD, owner); err != nil {
		ln.Close()
		_ = unix.Unlinkat(runFD, SocketName, 0)
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	per := s.PerProfile
	if per <= 0 {
		per = 1
	}
	ok = true
	return &server{profile: profile, owner: owner, runDir: runDir, ln: ln, busy: make(chan struct{}, per), ctx: ctx, cancel: cancel}, nil
}

// secureSocket gives the socket file to the profile user with mode 0600, acting on the file
// itself (an O_PATH handle opened without following links), never on a path.
func secureSocket(runFD int, owner Owner) error {
	fd, err := unix.Openat(runFD, SocketName, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return errors.New("the socket was replaced before it was secured")
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, procFD(fd), 0o600, 0); err != nil {
		return err
	}
	return unix.Fchownat(fd, "", owner.UID, owner.GID, unix.AT_EMPTY_PATH)
}

func procFD(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// inPlace reports whether the socket file is still there, as a socket.
func (srv *server) inPlace() bool {
	var st unix.Stat_t
	err := unix.Fstatat(int(srv.runDir.Fd()), SocketName, &st, unix.AT_SYMLINK_NOFOLLOW)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK && int(st.Uid) == srv.owner.UID
}

// Backoff after a failed accept: errors such as EMFILE or ENOBUFS pass, so the server waits a
// little and goes on; only closing the socket ends it.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

func (s *Sockets) serve(srv *server) {
	log := s.Log.WithValues("profile", srv.profile)
	backoff := time.Duration(0)
	for {
		conn, err := srv.ln.AcceptUnix()
		if err != nil {
			if srv.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			log.Error(err, "accept on the tool-run socket failed; retrying", "backoff", backoff)
			select {
			case <-srv.ctx.Done():
				return
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer conn.Close()
			s.handle(srv, conn, log)
		}()
	}
}

func (s *Sockets) handle(srv *server, conn *net.UnixConn, log logr.Logger) {
	reply := func(res Result) {
		runsTotal.WithLabelValues(srv.profile, string(res.Phase)).Inc()
		_ = conn.SetWriteDeadline(time.Now().Add(requestReadTimeout))
		_ = json.NewEncoder(conn).Encode(res)
		// Take in what is left of the request before closing, so the client reads the reply
		// rather than a reset.
		_ = conn.CloseWrite()
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(conn, maxRequestBytes))
	}
	uid, err := peerUID(conn)
	if err != nil {
		reply(Result{Phase: Rejected, ExitCode: -1, Message: "cannot identify the caller: " + err.Error()})
		return
	}
	if uid != srv.owner.UID {
		log.Info("refused a tool-run request from another user", "uid", uid)
		reply(Result{Phase: Rejected, ExitCode: -1,
			Message: fmt.Sprintf("uid %d is not the user of profile %s; only that profile's gateway may use this socket", uid, srv.profile)})
		return
	}
	select {
	case srv.busy <- struct{}{}:
		defer func() { <-srv.busy }()
	default:
		reply(Result{Phase: Rejected, ExitCode: -1, Message: fmt.Sprintf("profile %s already has %d tool runs in progress", srv.profile, cap(srv.busy))})
		return
	}
	_ = conn.SetReadDeadline(time.Now().Add(requestReadTimeout))
	var req Request
	dec := json.NewDecoder(io.LimitReader(conn, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		reply(Result{Phase: Rejected, ExitCode: -1, Message: "invalid request: " + err.Error()})
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	res, err := s.Executor.Execute(srv.ctx, srv.profile, req)
	if err != nil {
		log.Error(err, "tool run failed")
		if res.Message == "" {
			res.Message = err.Error()
		}
	}
	if res.Phase != Rejected {
		runSeconds.WithLabelValues(srv.profile).Observe(float64(res.DurationMillis) / 1000)
	}
	log.Info("tool run", "phase", res.Phase, "exitCode", res.ExitCode, "durationMillis", res.DurationMillis)
	reply(res)
}

func peerUID(conn *net.UnixConn) (int, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return -1, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return -1, err
	}
	if serr != nil {
		return -1, serr
	}
	return int(cred.Uid), nil
}
