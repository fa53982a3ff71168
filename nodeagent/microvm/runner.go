package microvm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"
	"github.com/kata-containers/kata-containers/src/runtime/pkg/govmm/qemu"
	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
)

// Defaults of a Runner.
const (
	DefaultMemoryMiB = 128
	DefaultOutputCap = 64 << 10
	MaxOutputCap     = 1 << 20
	// QuitGrace is how long QEMU gets to exit after a QMP quit before it is killed.
	QuitGrace = 2 * time.Second
	// seccompSandbox turns on QEMU's seccomp filter and denies what a VM never needs.
	seccompSandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
	// killWait bounds the wait for QEMU to go after systemd was told to kill it.
	killWait = 10 * time.Second
	// collectWait bounds the wait for systemd to forget a stopped unit.
	collectWait = 5 * time.Second
	// stderrTail is how much of QEMU's own output is kept for error messages.
	stderrTail = 4 << 10
)

// Files of the work folder and of each run's folder.
const (
	kernelFile   = "vmlinuz"
	initrdFile   = "initrd"
	qmpSocket    = "qmp.sock"
	serialSocket = "serial.sock"
)

// Config describes how the Runner boots its microVMs.
type Config struct {
	// Systemd starts each QEMU as a transient service with resource limits (see unit.go).
	// Required: without it NewRunner fails rather than run guests in the agent's own cgroup,
	// where a guest could get the agent killed by the OOM killer.
	Systemd *systemd.Conn
	// Root is the prefix under which the agent reaches the host's filesystem ("/" when empty).
	// QEMU and WorkDir are paths on the host; Kernel and Initramfs are read by the agent.
	Root string
	// QEMU is the qemu-system-x86_64 binary (looked up in PATH when empty).
	QEMU string
	// Kernel and Initramfs are the guest built by hack/microvm-guest.sh.
	Kernel, Initramfs string
	// WorkDir holds one private folder per run. It must be short enough for the unix socket
	// paths QEMU connects to in it (about 80 bytes).
	WorkDir string
	// UID and GID run QEMU when IDs is empty; both must be non-zero and known to the host's
	// passwd and group.
	UID, GID uint32
	// IDs are the users QEMU runs as, one per VM that may run at once: a VM takes one for its
	// whole life and no other VM runs as it meanwhile, so one compromised QEMU cannot reach
	// another VM's sockets or files. Each must be non-zero, known to the host's passwd and
	// group, and its uid and gid used by no other entry. One more than MaxConcurrent is the
	// KVM probe VM's own, so that tool runs never wait for the probe.
	IDs []ID
	// Accel is "tcg", "kvm" or "auto" (the default): KVM once a probe VM has booted under it
	// (see Runner.ProbeAccel), else TCG.
	Accel string
	// KVMProbeTimeout bounds auto's probe boot (DefaultKVMProbeTimeout when 0).
	KVMProbeTimeout time.Duration
	// MemoryMiB is the guest's RAM; OutputCap the bytes kept per stream.
	MemoryMiB, OutputCap int
	// MemoryOverheadMiB is what QEMU may use beyond the guest's RAM: its unit's MemoryMax is
	// MemoryMiB + MemoryOverheadMiB (default DefaultMemoryOverheadMiB).
	MemoryOverheadMiB int
	// MaxConcurrent is how many VMs exist at once, warm ones included (default and at most
	// len(IDs)); other runs wait for one to end.
	MaxConcurrent int
	// PoolSize is how many pre-booted VMs wait for a job (0: every run boots its own VM). At
	// most MaxConcurrent.
	PoolSize int
	// PoolShare is how many warm VMs one profile may hold at once (default 1): beyond it the
	// profile's runs boot cold, so one profile cannot take every warm VM.
	PoolShare int
	// MaxIdle is how long a warm VM waits for a job before it is replaced (DefaultMaxIdle).
	MaxIdle time.Duration
	Log     logr.Logger
}

// ID is a uid and gid one VM's QEMU runs as.
type ID struct{ UID, GID uint32 }

// DefaultMaxIdle is how long a warm VM waits for a job before it is replaced by a fresh one.
const DefaultMaxIdle = 10 * time.Minute

// Runner boots one microVM per request, each QEMU in a transient systemd service of its own.
type Runner struct {
	cfg       Config
	initramfs []byte // the base initramfs, padded to 4 bytes
	acc       accelState
	// slots holds the IDs no VM runs as: a VM takes one before it starts and gives it back
	// once it is gone.
	slots chan ID
	// waiting counts runs waiting for a slot: the pool does not refill while one does.
	waiting atomic.Int32
	pool    *pool
}

// NewRunner checks the configuration and prepares the guest files. It does not boot anything.
func NewRunner(cfg Config) (*Runner, error) {
	if cfg.Systemd == nil {
		return nil, errors.New("microvm: a systemd connection is required: every QEMU runs in a transient unit with memory and task limits")
	}
	if len(cfg.IDs) == 0 {
		cfg.IDs = []ID{{cfg.UID, cfg.GID}}
	}
	if err := checkIDs(cfg.IDs); err != nil {
		return nil, err
	}
	// The acceleration probe looks at the first user: they all have the same groups.
	cfg.UID, cfg.GID = cfg.IDs[0].UID, cfg.IDs[0].GID
	if cfg.Root == "" {
		cfg.Root = "/"
	}
	if cfg.QEMU == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return nil, fmt.Errorf("microvm: %w", err)
		}
		cfg.QEMU = p
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = DefaultMemoryMiB
	}
	if cfg.MemoryOverheadMiB == 0 {
		cfg.MemoryOverheadMiB = DefaultMemoryOverheadMiB
	}
	if cfg.MemoryMiB < 0 || cfg.MemoryOverheadMiB < 0 {
		return nil, fmt.Errorf("microvm: memory %d MiB + overhead %d MiB must not be negative", cfg.MemoryMiB, cfg.MemoryOverheadMiB)
	}
	if cfg.OutputCap == 0 {
		cfg.OutputCap = DefaultOutputCap
	}
	if cfg.OutputCap < 0 || cfg.OutputCap > MaxOutputCap {
		return nil, fmt.Errorf("microvm: output cap %d is outside 1..%d", cfg.OutputCap, MaxOutputCap)
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = len(cfg.IDs)
	}
	if cfg.MaxConcurrent > len(cfg.IDs) {
		return nil, fmt.Errorf("microvm: %d VMs at once need as many users; %d are given", cfg.MaxConcurrent, len(cfg.IDs))
	}
	if cfg.PoolSize < 0 || cfg.PoolSize > cfg.MaxConcurrent {
		return nil, fmt.Errorf("microvm: pool size %d is outside 0..%d (the VMs at once)", cfg.PoolSize, cfg.MaxConcurrent)
	}
	if cfg.PoolShare <= 0 {
		cfg.PoolShare = 1
	}
	if cfg.MaxIdle <= 0 {
		cfg.MaxIdle = DefaultMaxIdle
	}
	if !filepath.IsAbs(cfg.WorkDir) || !filepath.IsAbs(cfg.QEMU) {
		return nil, fmt.Errorf("microvm: work folder %q and QEMU %q must be absolute paths", cfg.WorkDir, cfg.QEMU)
	}
	cfg.WorkDir = filepath.Clean(cfg.WorkDir)
	// <WorkDir>/<16 hex>/serial.sock must fit a unix socket address (107 bytes).
	if n := len(cfg.WorkDir) + 1 + 16 + 1 + len(serialSocket); n > 107 {
		return nil, fmt.Errorf("microvm: work folder %q is too long for unix socket paths", cfg.WorkDir)
	}
	r := &Runner{cfg: cfg, slots: make(chan ID, cfg.MaxConcurrent)}
	for _, id := range cfg.IDs[:cfg.MaxConcurrent] {
		r.slots <- id
	}
	if err := r.prepare(); err != nil {
		return nil, err
	}
	if cfg.PoolSize > 0 {
		r.pool = newPool(r)
	}
	return r, nil
}

// checkIDs refuses root and any uid or gid that two VMs would share.
func checkIDs(ids []ID) error {
	uids, gids := map[uint32]bool{}, map[uint32]bool{}
	for _, id := range ids {
		if id.UID == 0 || id.GID == 0 {
			return errors.New("microvm: QEMU must run as a non-root user and group")
		}
		if uids[id.UID] || gids[id.GID] {
			return fmt.Errorf("microvm: uid %d / gid %d is given twice: every VM needs its own", id.UID, id.GID)
		}
		uids[id.UID], gids[id.GID] = true, true
	}
	return nil
}

// onHost is where the agent reaches a host path.
func (r *Runner) onHost(p string) string { return filepath.Join(r.cfg.Root, p) }

// prepare makes the work folder traversable (but not listable) by QEMU's user, copies the
// kernel where that user can read it and loads the base initramfs.
func (r *Runner) prepare() error {
	work := r.onHost(r.cfg.WorkDir)
	if err := os.MkdirAll(work, 0o711); err != nil { //nolint:gosec // traversable, not listable, by QEMU's user
		return fmt.Errorf("microvm: %w", err)
	}
	if err := os.Chmod(work, 0o711); err != nil { //nolint:gosec // traversable, not listable, by QEMU's user
		return fmt.Errorf("microvm: %w", err)
	}
	kernel, err := os.ReadFile(r.cfg.Kernel)
	if err != nil {
		return fmt.Errorf("microvm: guest kernel: %w", err)
	}
	if err := renameio.WriteFile(filepath.Join(work, kernelFile), kernel, 0o444); err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	base, err := os.ReadFile(r.cfg.Initramfs)
	if err != nil {
		return fmt.Errorf("microvm: guest initramfs: %w", err)
	}
	// The kernel finds the next archive only at a 4-byte boundary.
	r.initramfs = append(base, make([]byte, (4-len(base)%4)%4)...) //nolint:gocritic // base is not used again
	return r.initAccel()
}

// hostKHz reads the CPU clock from /proc/cpuinfo.
func hostKHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}

// Run boots a microVM for req and returns its result. Errors of the request itself come back
// as a Rejected result; an error return means the VM could not be run at all.
func (r *Runner) Run(ctx context.Context, req Request) (Result, error) {
	start := time.Now()
	if err := req.Validate(); err != nil {
		return Result{Phase: Rejected, Message: err.Error(), ExitCode: -1}, nil
	}
	ctx, cancel := context.WithDeadline(ctx, start.Add(req.Timeout()))
	defer cancel()
	res, err := r.runCold(ctx, req)
	res.DurationMillis = time.Since(start).Milliseconds()
	return res, err
}

// Execute runs req for profile: the host-local Executor. It takes a warm VM from the pool when
// one is there and the profile holds less than its share; otherwise it boots one.
func (r *Runner) Execute(ctx context.Context, profile string, req Request) (Result, error) {
	start := time.Now()
	if err := req.Validate(); err != nil {
		return Result{Phase: Rejected, Message: err.Error(), ExitCode: -1}, nil
	}
	ctx, cancel := context.WithDeadline(ctx, start.Add(req.Timeout()))
	defer cancel()
	var res Result
	var err error
	var v *vm
	var reason string
	switch {
	case r.pool == nil:
	case jobSize(req) > warmJobMax:
		reason = fmt.Sprintf("the job is over %d KiB: a cold boot carries it faster than the serial line", warmJobMax>>10)
	default:
		v, reason = r.pool.claim(profile)
	}
	if v != nil {
		res, err = r.runWarm(ctx, v, req)
		r.pool.done(profile)
		res.Start = StartWarm
	} else {
		res, err = r.runCold(ctx, req)
		res.Start, res.ColdReason = StartCold, reason
	}
	res.Route = RouteHost
	res.DurationMillis = time.Since(start).Milliseconds()
	return res, err
}

// Close stops the pool's refill and ends its warm VMs. Runs in progress are not affected.
func (r *Runner) Close() { r.pool.close() }

// Warm is how many pre-booted VMs wait for a job right now.
func (r *Runner) Warm() int { return r.pool.idleCount() }

// runCold boots a VM with req's job in its initramfs, once a slot is free.
func (r *Runner) runCold(ctx context.Context, req Request) (Result, error) {
	id, ok := r.acquire(ctx)
	if !ok {
		return Result{Phase: TimedOut, ExitCode: -1, Message: "no microVM slot became free before the timeout"}, nil
	}
	defer r.release(id)
	nonce, job, err := r.newJob(req)
	if err != nil {
		return Result{Phase: Error, ExitCode: -1}, err
	}
	v := &vm{id: id}
	defer r.destroy(v)
	if res, err := r.launch(ctx, v, job, req.Timeout()+unitRuntimeSlack); err != nil || res.Phase != "" {
		return res, err
	}
	return r.collect(ctx, v, nonce, req.Timeout(), func() error { return v.qmp.ExecuteCont(ctx) })
}

// warmJobMax bounds the job a warm VM takes over its serial line: the line carried 18-75 KB/s
// under TCG (less while other VMs boot), so a larger job boots cold with the job in its
// initramfs instead.
const warmJobMax = 16 << 10

// jobSize is about what a request adds to its job archive.
func jobSize(req Request) int {
	n := len(req.Stdin)
	for _, a := range req.Command {
		n += len(a) + 3
	}
	return n
}

// runWarm sends req's job to a warm VM that announced itself ready, reads its report and
// ends the VM: a warm VM serves one job only. After a report the VM is ended in the
// background, so the reply does not wait for QEMU to go; otherwise before the reply.
func (r *Runner) runWarm(ctx context.Context, v *vm, req Request) (Result, error) {
	res, err := r.deliver(ctx, v, req)
	if err == nil && (res.Phase == Succeeded || res.Phase == Failed) {
		r.pool.retire(v)
	} else {
		r.destroy(v)
		r.release(v.id)
	}
	return res, err
}

// newJob makes a fresh nonce and req's job archive tagged with it.
func (r *Runner) newJob(req Request) (string, []byte, error) {
	nonce, err := newNonce()
	if err != nil {
		return "", nil, err
	}
	job, err := JobArchive(req, nonce, r.cfg.OutputCap)
	return nonce, job, err
}

func (r *Runner) deliver(ctx context.Context, v *vm, req Request) (Result, error) {
	nonce, job, err := r.newJob(req)
	if err != nil {
		return Result{Phase: Error, ExitCode: -1}, err
	}
	return r.collect(ctx, v, nonce, req.Timeout(), func() error {
		stop := context.AfterFunc(ctx, func() { _ = v.serial.SetWriteDeadline(time.Now()) })
		defer stop()
		_, err := v.serial.Write(append([]byte("job "+strconv.Itoa(len(job))+"\n"), job...))
		return err
	})
}

// acquire takes a free slot (the ID a VM runs as), waiting until ctx ends. When none is free,
// it has the pool give up one idle warm VM, so a run that must boot cold is not stuck behind a
// full pool.
func (r *Runner) acquire(ctx context.Context) (ID, bool) {
	select {
	case id := <-r.slots:
		return id, true
	default:
	}
	r.waiting.Add(1)
	defer r.waiting.Add(-1)
	r.pool.evictOne()
	select {
	case id := <-r.slots:
		return id, true
	case <-ctx.Done():
		return ID{}, false
	}
}

// release gives a slot back once its VM is gone.
func (r *Runner) release(id ID) {
	r.slots <- id
	r.pool.poke()
}

func newNonce() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// errExited is the cause of a run's context when QEMU is gone before the run is over.
var errExited = errors.New("qemu exited before the guest started")

// vm is one running QEMU. An idle warm VM holds only this: no buffer of its serial line, which
// nobody reads until a job is sent.
type vm struct {
	id     ID
	unit   string
	dir    string // the run's folder, as the agent reaches it
	qmp    *qemu.QMP
	qmpOff chan struct{}
	// exited is closed when QEMU's output reaches end of file: QEMU is gone and systemd has
	// released the unit's copy of the pipe.
	exited chan struct{}
	stderr *tail
	serial *net.UnixConn
	ready  time.Time // when a warm VM announced itself ready
}

// launch starts QEMU as v.id with the base initramfs plus job (none for a warm VM) and
// returns once QEMU's QMP and serial connections are up; the guest's CPU is still stopped.
// An error means nothing could be started; a Result with a phase describes a VM that broke
// while starting. Either way the caller ends v with destroy.
func (r *Runner) launch(ctx context.Context, v *vm, job []byte, runtimeMax time.Duration) (Result, error) {
	log := r.cfg.Log
	failed := Result{Phase: Error, ExitCode: -1}
	var idBytes [8]byte
	if _, err := rand.Read(idBytes[:]); err != nil {
		return failed, err
	}
	name := hex.EncodeToString(idBytes[:])
	// The run's folder is root's; QEMU's group may only traverse it and read or connect to
	// what the agent put there, so QEMU cannot swap anything the agent later opens.
	hostDir := path.Join(r.cfg.WorkDir, name)
	dir := r.onHost(hostDir)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return failed, err
	}
	v.dir = dir
	dirFD, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return failed, err
	}
	defer unix.Close(dirFD)
	if err := writeShared(filepath.Join(dir, initrdFile), v.id.GID, r.initramfs, job); err != nil {
		return failed, err
	}
	// Short socket addresses through the folder's handle, whatever the root prefix.
	qmpLn, err := listen(dirFD, qmpSocket, v.id.GID)
	if err != nil {
		return failed, err
	}
	defer qmpLn.Close()
	serialLn, err := listen(dirFD, serialSocket, v.id.GID)
	if err != nil {
		return failed, err
	}
	defer serialLn.Close()
	if err := unix.Fchownat(dirFD, "", 0, int(v.id.GID), unix.AT_EMPTY_PATH); err != nil {
		return failed, err
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, procFD(dirFD), 0o710, 0); err != nil {
		return failed, err
	}

	began := time.Now()
	if err := r.start(ctx, v, name, hostDir, runtimeMax); err != nil {
		v.waitExit(500 * time.Millisecond)
		return v.failure(err), nil
	}
	launched := time.Since(began)
	// QEMU exiting ends every wait below at once, not only ctx.
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-v.exited:
			cancel(errExited)
		case <-runCtx.Done():
		}
	}()
	if err := v.connectQMP(runCtx, qmpLn, v.id.UID, qmpLogger{log: log.WithName("qmp")}); err != nil {
		return v.broke(runCtx, err), nil
	}
	serial, err := accept(runCtx, serialLn, v.id.UID)
	if err != nil {
		return v.broke(runCtx, fmt.Errorf("serial line: %w", err)), nil
	}
	v.serial = serial
	log.V(1).Info("microVM started", "unit", v.unit, "uid", v.id.UID, "launchMillis", launched.Milliseconds(),
		"connectedMillis", time.Since(began).Milliseconds())
	return Result{}, nil
}

// collect has send start the job (resume a cold guest, or deliver the job to a warm one) and
// reads the guest's report with the output caps, until ctx ends.
func (r *Runner) collect(ctx context.Context, v *vm, nonce string, timeout time.Duration, send func() error) (Result, error) {
	type report struct {
		rep *guestReport
		err error
	}
	begin := time.Now()
	line := &stamped{r: v.serial}
	reports := make(chan report, 1)
	go func() {
		rep, err := readReport(line, nonce, r.cfg.OutputCap, serialLimit(r.cfg.OutputCap))
		reports <- report{rep, err}
	}()
	if err := send(); err != nil && ctx.Err() == nil {
		return v.broke(ctx, fmt.Errorf("start the job: %w", err)), nil
	}
	sent := time.Since(begin)
	select {
	case rp := <-reports:
		r.cfg.Log.V(1).Info("tool run reported", "unit", v.unit, "warm", !v.ready.IsZero(), "sentMillis", ms(sent),
			"firstOutputMillis", ms(line.first.Sub(begin)), "reportMillis", ms(time.Since(begin)))
		if rp.err != nil {
			if errors.Is(rp.err, errSerialLimit) {
				return Result{Phase: Error, ExitCode: -1, Message: rp.err.Error()}, nil
			}
			// The guest stopped talking: wait briefly for QEMU's own account of why.
			v.waitExit(500 * time.Millisecond)
			return v.failure(rp.err), nil
		}
		return rp.rep.result(r.cfg.OutputCap), nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return Result{Phase: TimedOut, ExitCode: -1,
				Message: fmt.Sprintf("the run did not finish within %s; the microVM was stopped", timeout)}, nil
		}
		return Result{Phase: Error, ExitCode: -1, Message: "the request was canceled"}, ctx.Err()
	}
}

// stamped notes when the first byte came through it.
type stamped struct {
	r     io.Reader
	first time.Time
}

func (s *stamped) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if n > 0 && s.first.IsZero() {
		s.first = time.Now()
	}
	return n, err
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// destroy ends v's QEMU (if it was started), closes its serial line and removes its folder.
func (r *Runner) destroy(v *vm) {
	if v.exited != nil {
		r.stop(v)
	}
	if v.serial != nil {
		_ = v.serial.Close()
	}
	if v.dir != "" {
		_ = os.RemoveAll(v.dir)
	}
}

// start asks systemd to run QEMU in a transient unit of its own, named after the run. Whatever
// the error, v can be stopped: its unit and exit channel are set.
func (r *Runner) start(ctx context.Context, v *vm, name, hostDir string, runtimeMax time.Duration) error {
	v.unit, v.exited, v.stderr = UnitPrefix+name+".service", make(chan struct{}), &tail{max: stderrTail}
	out, in, err := os.Pipe()
	if err != nil {
		close(v.exited)
		return err
	}
	err = r.cfg.Systemd.StartTransient(ctx, v.unit, r.unitProperties(v.id, name, hostDir, runtimeMax, in))
	// systemd holds its own copy while the unit lives: end of file means QEMU is gone.
	_ = in.Close()
	go func() {
		// A small buffer: an idle warm VM keeps this goroutine.
		_, _ = io.CopyBuffer(v.stderr, out, make([]byte, 512))
		_ = out.Close()
		close(v.exited)
	}()
	if err != nil {
		return fmt.Errorf("start qemu: %w", err)
	}
	return nil
}

// listen makes a socket QEMU connects to in the run's folder: root's, and connectable by
// QEMU's group (gid) only.
func listen(dirFD int, name string, gid uint32) (*net.UnixListener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Net: "unix", Name: procFD(dirFD) + "/" + name})
	if err != nil {
		return nil, err
	}
	// The folder is removed as a whole.
	ln.SetUnlinkOnClose(false)
	if err := unix.Fchownat(dirFD, name, 0, int(gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		_ = ln.Close()
		return nil, err
	}
	if err := unix.Fchmodat(dirFD, name, 0o660, 0); err != nil {
		_ = ln.Close()
		return nil, err
	}
	return ln, nil
}

// accept takes one connection on ln, from a process of uid, or gives up when ctx ends. The
// listener takes no further connection afterwards.
func accept(ctx context.Context, ln *net.UnixListener, uid uint32) (*net.UnixConn, error) {
	stop := context.AfterFunc(ctx, func() { _ = ln.SetDeadline(time.Now()) })
	conn, err := ln.AcceptUnix()
	stop()
	_ = ln.Close()
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	peer, err := peerUID(conn)
	if err == nil && peer != int(uid) {
		err = fmt.Errorf("uid %d connected, not QEMU's user %d", peer, uid)
	}
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return conn, nil
}

// waitExit waits up to d for QEMU to be gone.
func (v *vm) waitExit(d time.Duration) {
	select {
	case <-v.exited:
	case <-time.After(d):
	}
}

// broke describes a step that failed while QEMU was starting: when QEMU has exited (the
// step's connection often notices first), that is the reason, with what QEMU said.
func (v *vm) broke(ctx context.Context, err error) Result {
	if ctx.Err() == nil || errors.Is(context.Cause(ctx), errExited) {
		v.waitExit(500 * time.Millisecond)
	}
	select {
	case <-v.exited:
		return v.failure(errExited)
	default:
		return v.failure(err)
	}
}

// failure describes a VM that broke off, with the end of what QEMU wrote.
func (v *vm) failure(err error) Result {
	msg := err.Error()
	if s := strings.TrimSpace(v.stderr.String()); s != "" {
		msg += ": qemu: " + s
	} else if errors.Is(err, errExited) {
		msg += " (it wrote nothing; the host's journal of " + v.unit + " may say why)"
	}
	return Result{Phase: Error, ExitCode: -1, Message: msg}
}

func (v *vm) connectQMP(ctx context.Context, ln *net.UnixListener, uid uint32, log qemu.QMPLog) error {
	conn, err := accept(ctx, ln, uid)
	if err != nil {
		return fmt.Errorf("qmp: %w", err)
	}
	v.qmpOff = make(chan struct{})
	// QEMU greets once it is initialized; if it dies first, the connection drops.
	q, _, err := qemu.QMPStartWithConn(ctx, conn, qemu.QMPConfig{Logger: log}, v.qmpOff)
	if err != nil {
		conn.Close()
		v.qmpOff = nil
		return fmt.Errorf("qmp: %w", err)
	}
	v.qmp = q
	return q.ExecuteQMPCapabilities(ctx)
}

// stop ends the VM: a QMP quit first, then systemd kills the unit if QEMU is still there after
// QuitGrace; last it waits until systemd has forgotten the unit.
func (r *Runner) stop(v *vm) {
	log := r.cfg.Log.WithValues("unit", v.unit)
	select {
	case <-v.exited:
	default:
		if v.qmp != nil {
			ctx, cancel := context.WithTimeout(context.Background(), QuitGrace/2)
			_ = v.qmp.ExecuteQuit(ctx)
			cancel()
		}
		select {
		case <-v.exited:
		case <-time.After(QuitGrace):
			log.Info("qemu did not quit; killing it")
			ctx, cancel := context.WithTimeout(context.Background(), killWait)
			if err := r.cfg.Systemd.Kill(ctx, v.unit, syscall.SIGKILL); err != nil {
				log.Error(err, "kill qemu")
			}
			select {
			case <-v.exited:
			case <-ctx.Done():
				log.Error(ctx.Err(), "qemu is still running; systemd stops it at its RuntimeMaxSec")
			}
			cancel()
		}
	}
	if v.qmp != nil {
		v.qmp.Shutdown()
		<-v.qmpOff
	}
	r.forget(v.unit, log)
}

// forget waits until systemd has collected the unit, clearing a failed state that would keep
// it.
func (r *Runner) forget(unit string, log logr.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), collectWait)
	defer cancel()
	for {
		state, err := r.cfg.Systemd.LoadState(ctx, unit)
		if err == nil && state == "not-found" {
			return
		}
		_ = r.cfg.Systemd.ResetFailed(ctx, unit)
		select {
		case <-ctx.Done():
			log.Error(err, "systemd still has the unit", "loadState", state)
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// writeShared writes parts into a new root-owned file that only gid may read.
func writeShared(path string, gid uint32, parts ...[]byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400) //nolint:gosec // a new file in the run's root-owned folder
	if err != nil {
		return err
	}
	for _, p := range parts {
		if _, err := f.Write(p); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Chown(0, int(gid)); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o440); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// qmpLogger sends govmm's log lines to logr.
type qmpLogger struct{ log logr.Logger }

func (l qmpLogger) V(level int32) bool { return l.log.V(int(level)).Enabled() }
func (l qmpLogger) Infof(format string, args ...interface{}) {
	l.log.V(1).Info(fmt.Sprintf(format, args...))
}
func (l qmpLogger) Warningf(format string, args ...interface{}) {
	l.log.Info(fmt.Sprintf(format, args...))
}
func (l qmpLogger) Errorf(format string, args ...interface{}) {
	l.log.Error(nil, fmt.Sprintf(format, args...))
}
