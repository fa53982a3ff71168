package microvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// Accelerations a Runner is configured with (Config.Accel).
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// DefaultKVMProbeTimeout bounds the probe boot of acceleration auto. A guest that works under
// KVM boots in well under a second, and even under TCG on a loaded shared host in about 3 s; a
// guest that hangs under KVM (nested virtualization without the CPU's flags) costs at most this
// much of one CPU, once, while tool runs go on under TCG.
const DefaultKVMProbeTimeout = 20 * time.Second

// maxReasonLen bounds Acceleration.Reason (the GatewayHost's field allows 256 characters).
const maxReasonLen = 240

// Acceleration is what a Runner's VMs run under and why.
type Acceleration struct {
	// Accel is AccelKVM or AccelTCG.
	Accel string
	// Reason is one sentence, at most 240 bytes of printable UTF-8.
	Reason string
	// Final is false while a probe boot under KVM is under way (the VMs use TCG meanwhile).
	Final bool
}

// accelMode is everything of a VM's command line and unit that depends on the acceleration.
type accelMode struct {
	Acceleration
	groups     []uint32
	kernelArgs string
}

// accelState holds the Runner's current mode; a successful probe replaces it once.
type accelState struct {
	cur   atomic.Pointer[accelMode]
	probe *accelMode // the KVM mode acceleration auto probes; nil when there is nothing to probe
	once  sync.Once
}

// mode is the acceleration a VM starting now uses. Read it once per VM: a probe may switch it.
func (r *Runner) mode() *accelMode { return r.acc.cur.Load() }

// Accel is the acceleration VMs starting now use: AccelKVM or AccelTCG.
func (r *Runner) Accel() string { return r.mode().Accel }

// Acceleration is the acceleration VMs starting now use, and why.
func (r *Runner) Acceleration() Acceleration { return r.mode().Acceleration }

// KernelArgs is the guest kernel's command line of VMs starting now.
func (r *Runner) KernelArgs() string { return r.mode().kernelArgs }

// initAccel chooses the acceleration from the configuration and the host's /dev/kvm. With auto
// and a /dev/kvm QEMU's user can open, VMs use TCG until ProbeAccel has booted one under KVM.
func (r *Runner) initAccel() error {
	dev := r.onHost("/dev/kvm")
	switch r.cfg.Accel {
	case AccelTCG:
		r.settle(r.newMode(AccelTCG, nil, "acceleration tcg is configured", true))
	case AccelKVM:
		// Forced: QEMU fails at once, with its own words, if it cannot use the device.
		groups, _ := kvmAccess(dev, r.cfg.UID, r.cfg.GID)
		r.settle(r.newMode(AccelKVM, groups, "acceleration kvm is configured", true))
	case "", AccelAuto:
		groups, why := kvmAccess(dev, r.cfg.UID, r.cfg.GID)
		if why != "" {
			r.settle(r.newMode(AccelTCG, nil, why, true))
			return nil
		}
		r.acc.probe = r.newMode(AccelKVM, groups, "", true)
		r.acc.cur.Store(r.newMode(AccelTCG, nil, "a probe boot under KVM is under way; TCG until it completes", false))
	default:
		return fmt.Errorf("microvm: acceleration %q is not tcg, kvm or auto", r.cfg.Accel)
	}
	return nil
}

func (r *Runner) newMode(accel string, groups []uint32, reason string, final bool) *accelMode {
	args := []string{"console=ttyS0", "quiet", "loglevel=1", "panic=-1", "reboot=t", "rdinit=/init"}
	if accel == AccelTCG {
		// Without it a microvm guest under TCG hangs calibrating its clock.
		if khz := hostKHz(); khz > 0 {
			args = append(args, "tsc_early_khz="+strconv.Itoa(khz))
		}
	}
	return &accelMode{Acceleration: Acceleration{Accel: accel, Reason: oneLine(reason, maxReasonLen), Final: final},
		groups: groups, kernelArgs: strings.Join(args, " ")}
}

// settle makes m the final mode and logs it: the one log line about the acceleration.
func (r *Runner) settle(m *accelMode) {
	r.acc.cur.Store(m)
	r.cfg.Log.Info("microVM acceleration", "accel", m.Accel, "reason", m.Reason)
}

// ProbeAccel decides acceleration auto: it boots one VM under KVM that runs `true`, through
// the same path as a tool run (its own transient unit, QEMU's user, seccomp), and switches the
// Runner to KVM only if that VM reports within Config.KVMProbeTimeout. Tool runs meanwhile use
// TCG and do not wait for it (the probe VM is not counted in MaxConcurrent). Otherwise,
// or with an acceleration that needs no probe, it returns at once. It probes once per Runner;
// later calls return the outcome.
func (r *Runner) ProbeAccel(ctx context.Context) Acceleration {
	r.acc.once.Do(func() {
		if r.acc.probe == nil {
			return
		}
		ok, why := r.probeKVM(ctx)
		if ok {
			m := *r.acc.probe
			m.Reason = oneLine(why, maxReasonLen)
			r.settle(&m)
			return
		}
		r.settle(r.newMode(AccelTCG, nil, why, true))
	})
	return r.Acceleration()
}

// probeKVM boots the probe VM under KVM and says whether it completed, and in one sentence why
// (not).
func (r *Runner) probeKVM(ctx context.Context) (bool, string) {
	const failed = "the probe boot under KVM did not complete"
	timeout := r.cfg.KVMProbeTimeout
	if timeout <= 0 {
		timeout = DefaultKVMProbeTimeout
	}
	// A Runner of its own, sharing the guest files and work folder, whose only mode is KVM. Its
	// slot is its own too when the configuration gives the probe a user of its own (one ID more
	// than MaxConcurrent), so tool runs never wait for it: one VM more, once, for a bounded
	// time. Otherwise it takes one of the Runner's slots.
	p := &Runner{cfg: r.cfg, initramfs: r.initramfs, slots: make(chan ID, 1)}
	p.cfg.Log = r.cfg.Log.WithName("kvm-probe")
	p.acc.cur.Store(r.acc.probe)
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if len(r.cfg.IDs) > r.cfg.MaxConcurrent {
		p.slots <- r.cfg.IDs[r.cfg.MaxConcurrent]
	} else {
		id, ok := r.acquire(pctx)
		if !ok {
			return false, fmt.Sprintf("%s: no microVM slot became free within %s", failed, timeout)
		}
		defer r.release(id)
		p.slots <- id
	}
	start := time.Now()
	secs := int((timeout + time.Second - 1) / time.Second)
	res, err := p.Run(pctx, Request{Command: []string{"true"}, TimeoutSeconds: secs})
	took := time.Since(start).Round(10 * time.Millisecond)
	switch {
	case err == nil && res.Phase == Succeeded:
		return true, fmt.Sprintf("a probe VM booted under KVM and ran its command in %s", took)
	case ctx.Err() != nil:
		return false, failed + ": the agent stopped during it"
	case res.Phase == TimedOut || errors.Is(pctx.Err(), context.DeadlineExceeded):
		return false, fmt.Sprintf("%s within %s", failed, timeout)
	case err != nil:
		return false, failed + ": " + err.Error()
	default:
		return false, fmt.Sprintf("%s: %s %s", failed, res.Phase, res.Message)
	}
}

// kvmAccess says which supplementary groups let QEMU's user open the KVM device (the usual
// `kvm` group), or in one sentence why it cannot.
func kvmAccess(dev string, uid, gid uint32) ([]uint32, string) {
	fi, err := os.Stat(dev)
	if errors.Is(err, os.ErrNotExist) {
		return nil, "no /dev/kvm on the host"
	}
	if err != nil {
		return nil, "/dev/kvm: " + err.Error()
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || fi.Mode()&os.ModeCharDevice == 0 {
		return nil, "/dev/kvm is not a character device"
	}
	perm := fi.Mode().Perm()
	switch {
	case st.Uid == uid && perm&0o600 == 0o600, perm&0o006 == 0o006:
		return nil, ""
	case perm&0o060 == 0o060 && st.Gid != 0:
		if st.Gid == gid {
			return nil, ""
		}
		return []uint32{st.Gid}, ""
	}
	return nil, fmt.Sprintf("QEMU's user (uid %d) cannot open /dev/kvm (mode %04o, owner %d, group %d): "+
		"it needs read and write access through a non-root group such as kvm", uid, perm, st.Uid, st.Gid)
}

// oneLine makes s one line of printable UTF-8 of at most max bytes: parts of it can come from
// QEMU's output.
func oneLine(s string, limit int) string {
	s = strings.ToValidUTF8(s, "?")
	s = strings.Join(strings.FieldsFunc(s, func(c rune) bool { return unicode.IsSpace(c) || !unicode.IsPrint(c) }), " ")
	if len(s) <= limit {
		return s
	}
	const more = "..."
	cut := limit - len(more)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + more
}
