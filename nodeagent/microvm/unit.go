package microvm

import (
	"os"
	"path"
	"strconv"
	"time"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"

	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
)

// Limits of each QEMU's transient unit. Memory is the guest's RAM plus Config.MemoryOverheadMiB;
// the rest are fixed because they do not depend on the guest's size.
const (
	// DefaultMemoryOverheadMiB is what QEMU may use beyond the guest's RAM: its own heap, the
	// TCG translation cache, its libraries, the kernel and initrd it reads (page cache counts
	// too). Measured under TCG with a 128 MiB guest: QEMU peaks at about 217 MB resident (the
	// guest's RAM + about 90 MB), whatever the command. TCG reserves up to 1 GiB for translated
	// code and fills it as the guest runs new code: a guest that keeps doing so meets this
	// limit and its QEMU is killed, not the agent. (QEMU's tb-size would bound the cache, but
	// with it set to 64 MiB guest output on the serial line was lost under load.)
	DefaultMemoryOverheadMiB = 160
	// unitTasksMax leaves room for QEMU's threads (4 measured under TCG, more for its thread
	// pool) and stops a runaway one.
	unitTasksMax = 64
	// unitCPUQuota is one CPU per VM: the guest has one vCPU.
	unitCPUQuota = time.Second
	// unitCPUWeight is below systemd's default of 100: under contention the agent and the
	// gateways come first.
	unitCPUWeight = 50
	// unitOOMScoreAdjust makes the kernel pick QEMU before the agent when the host itself runs
	// out of memory (the cgroup limit covers the rest).
	unitOOMScoreAdjust = 500
	// unitRuntimeSlack is added to the run's timeout (and to a warm VM's idle age plus the
	// longest timeout) for RuntimeMaxSec: if the agent dies, systemd still stops the VM.
	unitRuntimeSlack = time.Minute
)

// UnitPrefix starts the name of every tool-run unit: gateway-toolrun-<run id>.service.
const UnitPrefix = "gateway-toolrun-"

// qemuArgs is QEMU's command line for one run, in host paths. QEMU connects as a client to the
// QMP and serial sockets the agent listens on, so QEMU never writes to its run folder.
func (r *Runner) qemuArgs(m *accelMode, id, hostDir string) []string {
	return []string{
		r.cfg.QEMU,
		"-name", "toolrun-" + id,
		"-machine", "microvm",
		"-accel", m.Accel,
		"-m", strconv.Itoa(r.cfg.MemoryMiB) + "M",
		"-smp", "1",
		// No default devices (no NIC, no disk), no user config, no display, exit on reboot,
		// and the CPU stays stopped until the host has the serial line.
		"-no-user-config", "-nodefaults", "-nographic", "-no-reboot", "-S",
		"-chardev", "socket,id=qmp,path=" + path.Join(hostDir, qmpSocket),
		"-mon", "chardev=qmp,mode=control",
		"-chardev", "socket,id=serial0,path=" + path.Join(hostDir, serialSocket),
		"-serial", "chardev:serial0",
		"-kernel", path.Join(r.cfg.WorkDir, kernelFile),
		"-initrd", path.Join(hostDir, initrdFile),
		"-append", m.kernelArgs,
		"-sandbox", seccompSandbox,
	}
}

// unitProperties describe the transient service one QEMU runs in: its own cgroup with memory,
// task and CPU limits, QEMU's user, no capabilities, a read-only view of the host, no network,
// a deadline of its own, and stdout/stderr into output.
func (r *Runner) unitProperties(user ID, id, hostDir string, runtimeMax time.Duration, output *os.File) []systemd.Property {
	// One mode for the whole unit: a probe may switch the Runner's meanwhile.
	m := r.mode()
	groups := make([]string, 0, len(m.groups))
	for _, g := range m.groups {
		groups = append(groups, strconv.FormatUint(uint64(g), 10))
	}
	prop := func(name string, v any) systemd.Property {
		return systemd.Property{Name: name, Value: dbus.MakeVariant(v)}
	}
	fd := dbus.UnixFD(output.Fd()) //nolint:gosec // an open descriptor is a small non-negative int
	return []systemd.Property{
		sdbus.PropDescription("gateway tool-run microVM " + id),
		sdbus.PropType("exec"),
		sdbus.PropExecStart(r.qemuArgs(m, id, hostDir), true),
		// Collected as soon as it stops, whether QEMU exited cleanly or not.
		prop("CollectMode", "inactive-or-failed"),
		prop("User", strconv.FormatUint(uint64(user.UID), 10)),
		prop("Group", strconv.FormatUint(uint64(user.GID), 10)),
		prop("SupplementaryGroups", groups),
		prop("StandardOutputFileDescriptor", fd),
		prop("StandardErrorFileDescriptor", fd),
		prop("MemoryMax", uint64(r.cfg.MemoryMiB+r.cfg.MemoryOverheadMiB)<<20), //nolint:gosec // both sizes are checked positive by NewRunner
		prop("MemorySwapMax", uint64(0)),
		prop("TasksMax", uint64(unitTasksMax)),
		prop("CPUQuotaPerSecUSec", uint64(unitCPUQuota/time.Microsecond)),
		prop("CPUWeight", uint64(unitCPUWeight)),
		prop("OOMScoreAdjust", int32(unitOOMScoreAdjust)),
		prop("RuntimeMaxUSec", uint64(runtimeMax/time.Microsecond)), //nolint:gosec // a positive duration
		prop("TimeoutStopUSec", uint64(QuitGrace/time.Microsecond)),
		prop("NoNewPrivileges", true),
		prop("CapabilityBoundingSet", uint64(0)),
		prop("ProtectSystem", "strict"),
		prop("ProtectHome", "yes"),
		prop("PrivateTmp", true),
		prop("PrivateNetwork", true),
	}
}
