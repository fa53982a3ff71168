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
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/renameio/v2"
	"github.com/kata-containers/kata-containers/src/runtime/pkg/govmm/qemu"
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
)

// Config describes how the Runner boots its microVMs.
type Config struct {
	// QEMU is the qemu-system-x86_64 binary (looked up in PATH when empty).
	QEMU string
	// Kernel and Initramfs are the guest built by hack/microvm-guest.sh.
	Kernel, Initramfs string
	// WorkDir holds one private folder per run. It must be short enough for the unix socket
	// paths QEMU creates in it (about 80 bytes).
	WorkDir string
	// UID and GID run QEMU; both must be non-zero.
	UID, GID uint32
	// Accel is "tcg", "kvm" or "auto" (KVM when /dev/kvm is usable by UID/GID, else TCG).
	Accel string
	// MemoryMiB is the guest's RAM; OutputCap the bytes kept per stream.
	MemoryMiB, OutputCap int
	// MaxConcurrent is how many VMs run at once (default 1); others wait for a slot.
	MaxConcurrent int
	Log           logr.Logger
}

// Runner boots one microVM per request.
type Runner struct {
	cfg        Config
	kernel     string // the guest kernel copied into WorkDir, readable by UID
	initramfs  []byte // the base initramfs, padded to 4 bytes
	accel      string
	groups     []uint32
	kernelArgs string
	slots      chan struct{}
}

// NewRunner checks the configuration and prepares the guest files. It does not boot anything.
func NewRunner(cfg Config) (*Runner, error) {
	if cfg.UID == 0 || cfg.GID == 0 {
		return nil, errors.New("microvm: QEMU must run as a non-root user and group")
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
	if cfg.OutputCap == 0 {
		cfg.OutputCap = DefaultOutputCap
	}
	if cfg.OutputCap < 0 || cfg.OutputCap > MaxOutputCap {
		return nil, fmt.Errorf("microvm: output cap %d is outside 1..%d", cfg.OutputCap, MaxOutputCap)
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 1
	}
	if !filepath.IsAbs(cfg.WorkDir) {
		return nil, fmt.Errorf("microvm: work folder %q is not absolute", cfg.WorkDir)
	}
	// <WorkDir>/<16 hex>/serial.sock must fit a unix socket address (107 bytes).
	if n := len(cfg.WorkDir) + 1 + 16 + len("/serial.sock"); n > 107 {
		return nil, fmt.Errorf("microvm: work folder %q is too long for unix socket paths", cfg.WorkDir)
	}
	r := &Runner{cfg: cfg, slots: make(chan struct{}, cfg.MaxConcurrent)}
	if err := r.prepare(); err != nil {
		return nil, err
	}
	return r, nil
}

// prepare makes the work folder traversable (but not listable) by QEMU's user, copies the
// kernel where that user can read it and loads the base initramfs.
func (r *Runner) prepare() error {
	if err := os.MkdirAll(r.cfg.WorkDir, 0o711); err != nil { //nolint:gosec // traversable, not listable, by QEMU's user
		return fmt.Errorf("microvm: %w", err)
	}
	if err := os.Chmod(r.cfg.WorkDir, 0o711); err != nil { //nolint:gosec // traversable, not listable, by QEMU's user
		return fmt.Errorf("microvm: %w", err)
	}
	kernel, err := os.ReadFile(r.cfg.Kernel)
	if err != nil {
		return fmt.Errorf("microvm: guest kernel: %w", err)
	}
	r.kernel = filepath.Join(r.cfg.WorkDir, "vmlinuz")
	if err := renameio.WriteFile(r.kernel, kernel, 0o444); err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	base, err := os.ReadFile(r.cfg.Initramfs)
	if err != nil {
		return fmt.Errorf("microvm: guest initramfs: %w", err)
	}
	// The kernel finds the next archive only at a 4-byte boundary.
	r.initramfs = append(base, make([]byte, (4-len(base)%4)%4)...) //nolint:gocritic // base is not used again

	r.accel, r.groups = r.cfg.Accel, nil
	if r.accel == "" || r.accel == "auto" {
		r.accel, r.groups = pickAccel(r.cfg.UID, r.cfg.GID)
	}
	if r.accel != "tcg" && r.accel != "kvm" {
		return fmt.Errorf("microvm: acceleration %q is not tcg, kvm or auto", r.cfg.Accel)
	}
	args := []string{"console=ttyS0", "quiet", "loglevel=1", "panic=-1", "reboot=t", "rdinit=/init"}
	if r.accel == "tcg" {
		// Without it a microvm guest under TCG hangs calibrating its clock.
		if khz := hostKHz(); khz > 0 {
			args = append(args, "tsc_early_khz="+strconv.Itoa(khz))
		}
	}
	r.kernelArgs = strings.Join(args, " ")
	return nil
}

// Accel is the acceleration the Runner uses.
func (r *Runner) Accel() string { return r.accel }

// KernelArgs is the guest kernel's command line.
func (r *Runner) KernelArgs() string { return r.kernelArgs }

// pickAccel uses KVM when QEMU's user could open /dev/kvm through its group (the usual `kvm`
// group), adding that group to QEMU's credentials.
func pickAccel(uid, gid uint32) (string, []uint32) {
	fi, err := os.Stat("/dev/kvm")
	if err != nil {
		return "tcg", nil
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "tcg", nil
	}
	perm := fi.Mode().Perm()
	switch {
	case st.Uid == uid && perm&0o600 == 0o600, perm&0o006 == 0o006:
		return "kvm", nil
	case perm&0o060 == 0o060 && st.Gid != 0:
		if st.Gid == gid {
			return "kvm", nil
		}
		return "kvm", []uint32{st.Gid}
	}
	return "tcg", nil
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
	deadline := start.Add(req.Timeout())
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	select {
	case r.slots <- struct{}{}:
		defer func() { <-r.slots }()
	case <-ctx.Done():
		return Result{Phase: TimedOut, ExitCode: -1, Message: "no microVM slot became free before the timeout",
			DurationMillis: time.Since(start).Milliseconds()}, nil
	}
	res, err := r.boot(ctx, req)
	res.DurationMillis = time.Since(start).Milliseconds()
	return res, err
}

// vm is one running QEMU.
type vm struct {
	dir    string
	cmd    *exec.Cmd
	qmp    *qemu.QMP
	qmpOff chan struct{}
	exited chan struct{}
	stderr *capped
}

func (r *Runner) boot(ctx context.Context, req Request) (Result, error) {
	log := r.cfg.Log
	failed := Result{Phase: Error, ExitCode: -1}
	var id [8]byte
	var nonceBytes [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return failed, err
	}
	if _, err := rand.Read(nonceBytes[:]); err != nil {
		return failed, err
	}
	nonce := hex.EncodeToString(nonceBytes[:])
	job, err := JobArchive(req, nonce, r.cfg.OutputCap)
	if err != nil {
		return failed, err
	}

	dir := filepath.Join(r.cfg.WorkDir, hex.EncodeToString(id[:]))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return failed, err
	}
	defer os.RemoveAll(dir)
	if err := os.Chown(dir, int(r.cfg.UID), int(r.cfg.GID)); err != nil {
		return failed, err
	}
	initrd := filepath.Join(dir, "initrd")
	if err := writeOwned(initrd, r.cfg.UID, r.cfg.GID, r.initramfs, job); err != nil {
		return failed, err
	}

	// The QMP listener is made here and handed to QEMU, so the agent can connect at once.
	qmpPath := filepath.Join(dir, "qmp.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: qmpPath, Net: "unix"})
	if err != nil {
		return failed, err
	}
	ln.SetUnlinkOnClose(false)
	lnFile, err := ln.File()
	ln.Close()
	if err != nil {
		return failed, err
	}
	defer lnFile.Close()
	serialPath := filepath.Join(dir, "serial.sock")

	qlog := qmpLogger{log: log.WithName("qmp")}
	config := qemu.Config{
		Path: r.cfg.QEMU,
		// QEMU is stopped by this package (QMP quit, then kill), never by a context.
		Ctx:  context.Background(),
		Name: "toolrun-" + hex.EncodeToString(id[:]),
		Uid:  r.cfg.UID, Gid: r.cfg.GID, Groups: r.groups,
		Machine: qemu.Machine{Type: qemu.MachineTypeMicrovm, Acceleration: r.accel},
		Memory:  qemu.Memory{Size: strconv.Itoa(r.cfg.MemoryMiB) + "M"},
		SMP:     qemu.SMP{CPUs: 1},
		Kernel:  qemu.Kernel{Path: r.kernel, InitrdPath: initrd, Params: r.kernelArgs},
		QMPSockets: []qemu.QMPSocket{{
			Type: qemu.Unix, Protocol: qemu.Qmp, FD: lnFile, Server: true, NoWait: true,
		}},
		Devices: []qemu.Device{
			qemu.CharDevice{Backend: qemu.Socket, Driver: qemu.LegacySerial, ID: "serial0", Path: serialPath},
			qemu.LegacySerialDevice{Chardev: "serial0"},
		},
		// No default devices (no NIC, no disk), no user config, no display, exit on reboot,
		// and the CPU stays stopped until the host has the serial line.
		Knobs:          qemu.Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, NoReboot: true, Stopped: true},
		SeccompSandbox: seccompSandbox,
	}
	began := time.Now()
	var launched, connected, reported time.Duration
	cmd, stderr, err := qemu.LaunchQemu(config, qlog)
	if err != nil {
		return failed, fmt.Errorf("start qemu: %w", err)
	}
	launched = time.Since(began)
	v := &vm{dir: dir, cmd: cmd, exited: make(chan struct{}), stderr: &capped{max: 16 << 10}}
	go func() {
		_, _ = io.Copy(v.stderr, stderr)
		_ = cmd.Wait()
		close(v.exited)
	}()
	defer func() {
		log.V(1).Info("microVM done", "launchMillis", launched.Milliseconds(), "qmpReadyMillis", connected.Milliseconds(),
			"reportMillis", reported.Milliseconds(), "stoppedMillis", time.Since(began).Milliseconds())
	}()
	defer r.stop(v)

	if err := v.connectQMP(ctx, qmpPath, qlog); err != nil {
		return v.failure(err), nil
	}
	connected = time.Since(began)
	serial, err := dialUnix(ctx, serialPath)
	if err != nil {
		return v.failure(fmt.Errorf("serial line: %w", err)), nil
	}
	defer serial.Close()
	type report struct {
		rep *guestReport
		err error
	}
	reports := make(chan report, 1)
	go func() {
		rep, err := readReport(serial, nonce, r.cfg.OutputCap, serialLimit(r.cfg.OutputCap))
		reports <- report{rep, err}
	}()
	if err := v.qmp.ExecuteCont(ctx); err != nil {
		return v.failure(fmt.Errorf("start the guest: %w", err)), nil
	}

	select {
	case rp := <-reports:
		reported = time.Since(began)
		if rp.err != nil {
			if errors.Is(rp.err, errSerialLimit) {
				return Result{Phase: Error, ExitCode: -1, Message: rp.err.Error()}, nil
			}
			// The guest stopped talking: wait briefly for QEMU's own account of why.
			select {
			case <-v.exited:
			case <-time.After(500 * time.Millisecond):
			}
			return v.failure(rp.err), nil
		}
		return rp.rep.result(r.cfg.OutputCap), nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return Result{Phase: TimedOut, ExitCode: -1,
				Message: fmt.Sprintf("the run did not finish within %s; the microVM was stopped", req.Timeout())}, nil
		}
		return Result{Phase: Error, ExitCode: -1, Message: "the request was canceled"}, ctx.Err()
	}
}

// failure describes a VM that broke off, with what QEMU said on stderr.
func (v *vm) failure(err error) Result {
	msg := err.Error()
	if s := strings.TrimSpace(v.stderr.String()); s != "" {
		msg += ": qemu: " + s
	}
	return Result{Phase: Error, ExitCode: -1, Message: msg}
}

func (v *vm) connectQMP(ctx context.Context, path string, log qemu.QMPLog) error {
	conn, err := dialUnix(ctx, path)
	if err != nil {
		return fmt.Errorf("qmp: %w", err)
	}
	v.qmpOff = make(chan struct{})
	// QEMU greets only once it is initialized; if it dies first, the connection drops.
	q, _, err := qemu.QMPStartWithConn(ctx, conn, qemu.QMPConfig{Logger: log}, v.qmpOff)
	if err != nil {
		conn.Close()
		v.qmpOff = nil
		return fmt.Errorf("qmp: %w", err)
	}
	v.qmp = q
	return q.ExecuteQMPCapabilities(ctx)
}

// stop ends the VM: a QMP quit first, SIGKILL if QEMU is still there after QuitGrace.
func (r *Runner) stop(v *vm) {
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
			r.cfg.Log.Info("qemu did not quit; killing it", "pid", v.cmd.Process.Pid)
			_ = v.cmd.Process.Kill()
			<-v.exited
		}
	}
	if v.qmp != nil {
		v.qmp.Shutdown()
		<-v.qmpOff
	}
}

// dialUnix connects to a unix socket QEMU creates, retrying until it exists.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return conn, nil
		}
		if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// writeOwned writes parts into a new file readable only by uid.
func writeOwned(path string, uid, gid uint32, parts ...[]byte) error {
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
	if err := f.Chown(int(uid), int(gid)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// capped keeps the first max bytes written to it and drops the rest.
type capped struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := c.max - len(c.buf); room > 0 {
		c.buf = append(c.buf, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (c *capped) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
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
