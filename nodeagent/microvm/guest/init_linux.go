package guest

import (
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The guest's fixed layout (hack/microvm-guest.sh).
const (
	serialDevice = "/dev/ttyS0"
	readyLine    = "gwvm ready\n"
	workDir      = "/tmp/work"
	// The one unprivileged guest user (tool in the guest's /etc/passwd).
	toolUID, toolGID = 1000, 1000
)

var toolEnv = []string{"PATH=/bin", "HOME=" + workDir, "USER=tool", "LOGNAME=tool", "SHELL=/bin/sh"}

// Run is the guest's init: it sets the guest up, takes its job, runs it, reports and powers
// the guest off. It never returns; on any failure it powers off without a report, which the
// host reads as a broken guest.
func Run() {
	if err := setUp(); err != nil {
		fail("set up", err)
	}
	job, serial, err := takeJob()
	if err != nil {
		fail("take the job", err)
	}
	stdout, stderr, code, err := execute(job)
	if err != nil {
		fail("run the job", err)
	}
	report := Report(job.Nonce, stdout, stderr, code)
	if _, err := serial.Write(report); err != nil {
		fail("report", err)
	}
	// The frames must leave the serial port before the machine goes.
	_ = unix.IoctlSetInt(int(serial.Fd()), unix.TCSBRK, 1)
	_ = serial.Close()
	powerOff()
}

func fail(step string, err error) {
	_, _ = os.Stderr.WriteString("gateway-guest-init: " + step + ": " + err.Error() + "\n")
	powerOff()
}

func powerOff() {
	unix.Sync()
	for {
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}
}

// setUp does everything that does not depend on the job, so that a warm guest has it done
// before it says it is ready.
func setUp() error {
	mounts := []struct{ fs, dir, data string }{
		{"proc", "/proc", ""},
		{"sysfs", "/sys", ""},
		{"devtmpfs", "/dev", "mode=0755"},
		{"tmpfs", "/run", "mode=0700"},
	}
	for _, m := range mounts {
		var flags uintptr
		if m.fs == "devtmpfs" {
			flags = unix.MS_NOSUID
		}
		if err := unix.Mount(m.fs, m.dir, m.fs, flags, m.data); err != nil {
			return errors.New("mount " + m.dir + ": " + err.Error())
		}
	}
	// The serial line is the host's channel: only root may open it.
	for _, dev := range []string{"/dev/console", serialDevice} {
		if err := unix.Fchmodat(unix.AT_FDCWD, dev, 0o600, 0); err != nil {
			return errors.New("chmod " + dev + ": " + err.Error())
		}
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	if err := unix.Mkdir(workDir, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, workDir, 0o1777, 0); err != nil {
		return err
	}
	return dropPrivilegesForChildren()
}

func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return errors.New("lo: " + err.Error())
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return errors.New("lo up: " + err.Error())
	}
	return nil
}

// dropPrivilegesForChildren sets no_new_privs and empties the capability bounding set on every
// thread of the init, so the command inherits both. The init keeps its own effective
// capabilities (it still mounts nothing, but kills, reaps and powers off), and it never execs.
func dropPrivilegesForChildren() error {
	if _, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); errno != 0 {
		return errors.New("no_new_privs: " + errno.Error())
	}
	for c := 0; c <= unix.CAP_LAST_CAP; c++ {
		if _, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(c), 0); errno != 0 && errno != unix.EINVAL {
			return errors.New("drop capability " + strconv.Itoa(c) + ": " + errno.Error())
		}
	}
	return nil
}

// takeJob reads the job from the initramfs (cold) or, when the guest booted without one
// (warm), announces the guest ready on the serial line and reads the job from it. It returns
// the serial line, open for the report.
func takeJob() (*Job, *os.File, error) {
	if _, err := os.Lstat("/" + fileNonce); err == nil {
		files := map[string][]byte{}
		for _, name := range []string{fileCmd, fileStdin, fileCap, fileNonce} {
			b, err := readNoFollow("/" + name)
			if err != nil {
				return nil, nil, err
			}
			files[name] = b
		}
		// Nothing the command can read holds the nonce.
		if err := os.Remove("/" + fileNonce); err != nil {
			return nil, nil, err
		}
		job, err := NewJob(files)
		if err != nil {
			return nil, nil, err
		}
		serial, err := os.OpenFile(serialDevice, os.O_WRONLY|unix.O_NOCTTY, 0)
		return job, serial, err
	}
	serial, err := os.OpenFile(serialDevice, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := makeRaw(int(serial.Fd())); err != nil {
		return nil, nil, err
	}
	if err := rehearse(); err != nil {
		return nil, nil, err
	}
	// Said once, before any job exists: nothing else runs yet, so nothing can forge it.
	if _, err := serial.WriteString(readyLine); err != nil {
		return nil, nil, err
	}
	line, err := readLine(serial, maxJobLine)
	if err != nil {
		return nil, nil, err
	}
	size, err := ParseJobLine(line)
	if err != nil {
		return nil, nil, err
	}
	archive := make([]byte, size)
	if _, err := io.ReadFull(serial, archive); err != nil {
		return nil, nil, err
	}
	files, err := ParseArchive(archive)
	if err != nil {
		return nil, nil, err
	}
	job, err := NewJob(files)
	return job, serial, err
}

// rehearse runs a command of no consequence the way a job's runs, before the guest says it is
// ready: under software emulation, code runs slowly the first time (QEMU translates it), so the
// job's own run finds the init's, the kernel's and the shell's paths already translated.
func rehearse() error {
	stdout, stderr, _, err := execute(&Job{Script: []byte("exec 'sh' '-c' 'echo'\n"), Cap: 16})
	_ = Report("0", stdout, stderr, 0)
	return err
}

func readNoFollow(name string) ([]byte, error) {
	f, err := os.OpenFile(name, os.O_RDONLY|unix.O_NOFOLLOW, 0) //nolint:gosec // one of the job's fixed paths
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, MaxJob))
}

// makeRaw puts the serial line in raw mode (8-bit clean, no echo, no line editing), at the
// speed the host's side expects.
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON | unix.IXOFF | unix.INPCK
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB | unix.CBAUD
	t.Cflag |= unix.CS8 | unix.B115200
	t.Ispeed, t.Ospeed = unix.B115200, unix.B115200
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

// readLine reads one line a byte at a time, so that nothing after it is consumed.
func readLine(r io.Reader, limit int) ([]byte, error) {
	var line []byte
	b := make([]byte, 1)
	for len(line) <= limit {
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		if b[0] == '\n' {
			return line, nil
		}
		line = append(line, b[0])
	}
	return nil, errors.New("the job line is too long")
}

// execute runs the job's command as the guest user with the job's stdin, drains its stdout and
// stderr to their ends keeping Cap+1 bytes of each, and once it exits kills every other process
// in the guest. It returns the kept output and the exit code as sh reports it.
func execute(job *Job) (stdout, stderr []byte, code int, err error) {
	stdin, err := memFile("stdin", job.Stdin)
	if err != nil {
		return nil, nil, 0, err
	}
	defer unix.Close(stdin)
	outR, outW, err := pipe()
	if err != nil {
		return nil, nil, 0, err
	}
	errR, errW, err := pipe()
	if err != nil {
		return nil, nil, 0, err
	}
	out := &Capture{Limit: job.Cap + 1}
	errs := &Capture{Limit: job.Cap + 1}
	drained := make(chan struct{}, 2)
	for _, s := range []struct {
		c *Capture
		r *os.File
	}{{out, outR}, {errs, errR}} {
		go func() {
			_ = s.c.Drain(s.r)
			_ = s.r.Close()
			drained <- struct{}{}
		}()
	}

	argv, direct := Argv(job.Script)
	if !direct {
		// A script of another form: the guest's shell reads it, as the user.
		argv = []string{"sh", "-c", string(job.Script)}
	}
	bin := argv[0]
	if !strings.Contains(bin, "/") {
		bin = "/bin/" + bin
	}
	//nolint:gosec // running the job's command, as the unprivileged guest user, is the point
	pid, forkErr := syscall.ForkExec(bin, argv, &syscall.ProcAttr{
		Dir:   workDir,
		Env:   toolEnv,
		Files: []uintptr{uintptr(stdin), outW.Fd(), errW.Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Credential: &syscall.Credential{Uid: toolUID, Gid: toolGID, Groups: []uint32{}},
		},
	})
	_ = outW.Close()
	_ = errW.Close()
	if forkErr != nil {
		// As sh reports a command it cannot run.
		code = 126
		msg := ": cannot execute: "
		if errors.Is(forkErr, syscall.ENOENT) {
			code, msg = 127, ": not found"
		} else {
			msg += forkErr.Error()
		}
		_, _ = errs.Write([]byte(argv[0] + msg + "\n"))
	} else {
		code, err = waitFor(pid)
	}
	// Nothing the command left behind keeps running or keeps a stream open.
	killAll()
	<-drained
	<-drained
	return out.Kept, errs.Kept, code, err
}

func pipe() (r, w *os.File, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(p[0]), "pipe"), os.NewFile(uintptr(p[1]), "pipe"), nil
}

// memFile is a sealed, read-only in-memory file holding data, read from its start.
func memFile(name string, data []byte) (int, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, err
	}
	for rest := data; len(rest) > 0; {
		n, err := unix.Write(fd, rest)
		if err != nil {
			unix.Close(fd)
			return -1, err
		}
		rest = rest[n:]
	}
	seals := unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		unix.Close(fd)
		return -1, err
	}
	// A read-only descriptor: the command cannot write through its stdin.
	ro, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	unix.Close(fd)
	return ro, err
}

// waitFor reaps pid (and any orphan that ends meanwhile) and returns its exit code as sh
// reports it: 128+signal for a killed command.
func waitFor(pid int) (int, error) {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		if got != pid {
			continue
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ws.ExitStatus(), nil
	}
}

// killAll kills every process but the init (the guest user's, as nothing else runs) and reaps
// them. One kill(-1) reaches them all: the kernel sends it under the lock fork takes, and a
// process with SIGKILL pending creates no child. It never reports "none left", as kernel
// threads also take (and ignore) the signal.
func killAll() {
	_ = unix.Kill(-1, unix.SIGKILL)
	for {
		_, err := unix.Wait4(-1, nil, 0, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
	}
}
