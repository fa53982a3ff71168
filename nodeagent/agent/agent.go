package agent

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/drift"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
)

// Options configure one node agent.
type Options struct {
	// HostName is this host's GatewayHost name.
	HostName string
	// HostLabels are extra labels the agent reports on its GatewayHost; each must be under
	// v1.LabelReportedPrefix (facts a host reports, never a basis for trust).
	HostLabels map[string]string
	// Root is the prefix of the host's filesystem ("/" on a real host).
	Root string
	// HostTools runs the host's systemd-analyze and useradd chrooted into Root, for an agent
	// whose container image carries neither (the DaemonSet).
	HostTools bool
	// BusAddress is the D-Bus address of the host's system bus. Required.
	BusAddress string
	// ProcRoot is where the host's /proc is read ("/proc" on a real host).
	ProcRoot string
	// Launcher is the launch binary installed on the host.
	Launcher string
	// Python is the interpreter gateways run.
	Python string
	// KeepReleases is how many releases stay on disk.
	KeepReleases int
	// ReleaseFileRoot is the only folder (on the agent's own filesystem) file:// release URLs
	// may name a file in; empty turns file:// off. See DefaultReleaseFileRoot.
	ReleaseFileRoot string
	// HeartbeatInterval is how often the host's Lease is renewed.
	HeartbeatInterval time.Duration
	// LeaseNamespace holds the host's heartbeat Lease; empty: the agent beats in the
	// GatewayHost's status instead (what agents did before Leases).
	LeaseNamespace string
	// StatusRefresh bounds how long the GatewayHost's status goes unwritten while nothing in
	// it changes (DefaultStatusRefresh).
	StatusRefresh time.Duration
	// ProofTimeout bounds the wait for a restarted gateway.
	ProofTimeout time.Duration
	// MetricsAddr and ProbeAddr are the listen addresses of metrics and health ("0": off).
	MetricsAddr, ProbeAddr string
	// Version is the agent's version, reported on the GatewayHost.
	Version string
	// BeforeStep is passed to the applier (tests only).
	BeforeStep func(apply.Step)
	// RunAgain lets a test run an agent a second time in one process (controller names are
	// unique per process otherwise).
	RunAgain bool
	// MicroVM turns on the host-local tool-run path when its guest is set.
	MicroVM MicroVMOptions
	// ToolRuns say which routes the host offers its profiles' tool runs.
	ToolRuns ToolRunOptions
	// ConcurrentApplies is how many profiles are applied at once (DefaultConcurrentApplies).
	ConcurrentApplies int
	// ApplyTimeout bounds one apply of one profile (DefaultApplyTimeout).
	ApplyTimeout time.Duration
	// ReproveInterval is the backstop behind the drift watches: how often each instance is
	// proven again in full although nothing was seen to change (DefaultReproveInterval).
	ReproveInterval time.Duration
}

// MicroVMOptions configure the host-local microVM path: a socket per profile at
// $AGENT_HOME/run/toolrun.sock, served by a QEMU microvm per request.
type MicroVMOptions struct {
	// Guest is the folder of hack/microvm-guest.sh's output (vmlinuz, initramfs.cpio.gz);
	// empty turns the path off.
	Guest string
	// QEMU is the qemu-system-x86_64 binary (PATH when empty).
	QEMU string
	// User names the system users QEMU runs as: VM slot i runs as <User>_<i>, created under
	// Root when missing, so no two VMs that exist at once share a uid.
	User string
	// WorkDir holds the per-run folders, a path on the host; keep it short (unix socket paths).
	WorkDir string
	// Accel is tcg, kvm or auto (KVM once a probe VM has booted under it, else TCG).
	Accel string
	// KVMProbeTimeout bounds auto's probe boot (microvm.DefaultKVMProbeTimeout when 0).
	KVMProbeTimeout time.Duration
	// MemoryMiB and OutputCap size each VM. MaxConcurrent is how many VMs exist at once,
	// warm ones included (default PoolSize+1).
	MemoryMiB, OutputCap, MaxConcurrent int
	// PoolSize is how many pre-booted VMs wait for a job; PoolShare how many of them one
	// profile may hold at once (default 1); MaxIdle how long one waits before it is replaced.
	PoolSize, PoolShare int
	MaxIdle             time.Duration
	// MemoryOverheadMiB is what QEMU may use beyond the guest's RAM before its unit's
	// MemoryMax stops it.
	MemoryOverheadMiB int
}

// ToolRunOptions configure the routes of the tool-run sockets.
type ToolRunOptions struct {
	// Route is RouteAuto (the default), RouteHost or RouteCluster.
	Route string
	// Namespace holds the ToolRuns of the cluster route (DefaultToolRunNamespace): the
	// namespace where the controller manager grants each host its slots.
	Namespace string
	// Grace is how long a cluster run may take beyond its timeout (DefaultToolRunGrace).
	Grace time.Duration
	// HostPerProfile is how many host-local runs, warm or cold, one profile may have at once
	// (default 1); its warm ones are bounded by MicroVMOptions.PoolShare as well.
	HostPerProfile int
}

// DefaultToolRunNamespace is the operator's namespace in config/, where the manager keeps each
// host's Role (its --material-namespace).
const DefaultToolRunNamespace = "gateway-operator-system"

// Scheme has the kinds the agent reads and writes.
func Scheme() *runtime.Scheme {
	s := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(s)
	_ = v1.AddToScheme(s)
	return s
}

// DefaultMemoryLimit is the agent's soft memory limit (runtime/debug.SetMemoryLimit) unless
// GOMEMLIMIT is set: an idle agent holds little, and without a limit the Go runtime lets its heap
// grow to twice what is live before collecting, and keeps freed pages for a while.
const DefaultMemoryLimit = 20 << 20

// Run runs the agent until ctx ends.
func Run(ctx context.Context, cfg *rest.Config, o Options, log logr.Logger) error {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(DefaultMemoryLimit)
	}
	if err := v1.ValidateHostName(o.HostName); err != nil {
		return err
	}
	if o.BusAddress == "" {
		return fmt.Errorf("a D-Bus address for the host's systemd is required")
	}
	if o.ReleaseFileRoot != "" && !filepath.IsAbs(o.ReleaseFileRoot) {
		return fmt.Errorf("the release file folder %q is not an absolute path", o.ReleaseFileRoot)
	}
	unlock, err := lockHost(layout.Host{Root: o.Root})
	if err != nil {
		return err
	}
	defer unlock()

	sd, err := systemd.Dial(ctx, o.BusAddress)
	if err != nil {
		return err
	}
	defer sd.Close()

	host := layout.Host{Root: o.Root, HostTools: o.HostTools}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: Scheme(),
		Logger: log,
		// Watch only this host: its own GatewayHost and the instances labeled with its name.
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&v1.GatewayInstance{}: {Label: labels.SelectorFromSet(labels.Set{v1.LabelHost: o.HostName})},
			&v1.GatewayHost{}:     {Field: fields.OneTermEqualSelector("metadata.name", o.HostName)},
		},
			// The agent never reads managedFields; the cache need not hold them.
			DefaultTransform: cache.TransformStripManagedFields()},
		Controller:             config.Controller{SkipNameValidation: &o.RunAgain},
		Metrics:                metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress: o.ProbeAddr,
	})
	if err != nil {
		return err
	}
	applier := &apply.Applier{
		Host:         host,
		Systemd:      sd,
		Releases:     &release.Store{Dir: host.On(layout.ReleasesDir), FileRoot: o.ReleaseFileRoot},
		ProcRoot:     o.ProcRoot,
		Launcher:     o.Launcher,
		Python:       o.Python,
		KeepReleases: o.KeepReleases,
		ProofTimeout: o.ProofTimeout,
		BeforeStep:   o.BeforeStep,
		Log:          log.WithName("apply"),
	}
	runner, err := startMicroVMs(o, sd, log.WithName("microvm"))
	if err != nil {
		return err
	}
	if runner != nil {
		// After the sockets: the warm VMs go once nothing can claim one.
		defer runner.Close()
	}
	router, toolRuns, err := toolRunDoor(o, mgr, runner, log.WithName("toolruns"))
	if err != nil {
		return err
	}
	if toolRuns != nil {
		defer toolRuns.Close()
	}
	caps := probeCapabilities(host, runner != nil)
	if runner != nil {
		caps = withAcceleration(caps, runner.Acceleration())
	}
	reported, err := ReportedLabels(caps, o.HostLabels)
	if err != nil {
		return err
	}
	beat := &Heartbeat{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Host: o.HostName, Labels: reported,
		Version: o.Version, Systemd: sd, Interval: o.HeartbeatInterval,
		LeaseNamespace: o.LeaseNamespace, StatusRefresh: o.StatusRefresh,
		Capabilities: caps, Space: applier.StagingSpace}
	if err := mgr.Add(beat); err != nil {
		return err
	}
	// Drift: hints from inotify and systemd's signals queue the profile they concern.
	tracker := &drift.Tracker{}
	watcher := &drift.Watcher{Host: host, Systemd: sd, Hint: tracker.Add, Log: log.WithName("drift")}
	if err := watcher.Start(); err != nil {
		return err
	}
	if err := mgr.Add(manager.RunnableFunc(watcher.Run)); err != nil {
		return err
	}
	if err := (&InstanceReconciler{
		Drift: tracker, Watcher: watcher, ReproveInterval: o.ReproveInterval,
		Hold:   beat.Duplicate,
		Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Host: o.HostName, Applier: applier, ToolRuns: toolRuns, Router: router,
		ConcurrentApplies: o.ConcurrentApplies, ApplyTimeout: o.ApplyTimeout,
		Recorder: mgr.GetEventRecorder("gateway-agent-" + o.HostName),
	}).SetupWithManager(mgr); err != nil {
		return err
	}
	if o.ProbeAddr != "0" && o.ProbeAddr != "" {
		// Live only while systemd answers: an agent that cannot reach it cannot apply or prove.
		if err := mgr.AddHealthzCheck("systemd", systemdCheck(sd)); err != nil {
			return err
		}
		if err := mgr.AddReadyzCheck("ping", healthz.Ping); err != nil {
			return err
		}
	}
	if runner != nil {
		// Acceleration auto boots a probe VM under KVM in the background; tool runs use TCG
		// until it is done, and the host's capabilities say so.
		probeCtx, cancelProbe := context.WithCancel(ctx)
		probed := make(chan struct{})
		go func() {
			defer close(probed)
			beat.SetCapabilities(withAcceleration(caps, runner.ProbeAccel(probeCtx)))
		}()
		// Before the systemd connection closes: the probe's VM is stopped through it.
		defer func() { cancelProbe(); <-probed }()
	}
	return mgr.Start(ctx)
}

// withAcceleration adds what the microVMs run under, and why, to c.
func withAcceleration(c v1.HostCapabilities, a microvm.Acceleration) v1.HostCapabilities {
	c.MicroVMAcceleration = v1.AccelerationTCG
	if a.Accel == microvm.AccelKVM {
		c.MicroVMAcceleration = v1.AccelerationKVM
	}
	c.MicroVMAccelerationReason = a.Reason
	if len(c.MicroVMAccelerationReason) > v1.MaxAccelerationReasonLength {
		c.MicroVMAccelerationReason = strings.ToValidUTF8(c.MicroVMAccelerationReason[:v1.MaxAccelerationReasonLength], "")
	}
	return c
}

// toolRunDoor makes the router of the profiles' tool-run sockets and the sockets, both nil when
// the host offers no route.
func toolRunDoor(o Options, mgr manager.Manager, local *microvm.Runner, log logr.Logger) (*ToolRouter, *microvm.Sockets, error) {
	var exec microvm.Executor
	if local != nil {
		exec = local
	}
	ns := o.ToolRuns.Namespace
	if ns == "" {
		ns = DefaultToolRunNamespace
	}
	cluster := &ClusterRuns{Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Namespace: ns, Host: o.HostName, Grace: o.ToolRuns.Grace}
	router, err := NewToolRouter(o.ToolRuns.Route, exec, cluster)
	if err != nil || router == nil {
		return nil, nil, err
	}
	router.HostPerProfile = o.ToolRuns.HostPerProfile
	log.Info("tool-run sockets on", "route", router.Policy, "hostLocal", router.Local != nil, "cluster", router.Cluster != nil, "namespace", ns)
	return router, &microvm.Sockets{Executor: router, PerProfile: SocketsPerProfile, Log: log}, nil
}

// startMicroVMs prepares the host-local tool-run runner, or returns nil when off. Each QEMU
// runs in a transient unit of the host's systemd (sd), with its own limits, as a user of its
// own. Its warm pool, if any, starts booting at once; Close ends it.
func startMicroVMs(o Options, sd *systemd.Conn, log logr.Logger) (*microvm.Runner, error) {
	m := o.MicroVM
	if m.Guest == "" {
		return nil, nil
	}
	if m.User == "" {
		m.User = DefaultMicroVMUser
	}
	if m.WorkDir == "" {
		m.WorkDir = DefaultMicroVMWorkDir
	}
	if m.MaxConcurrent <= 0 {
		m.MaxConcurrent = m.PoolSize + 1
	}
	if m.MaxConcurrent > MaxMicroVMs || m.PoolSize < 0 {
		return nil, fmt.Errorf("--microvm-max-concurrent %d / --microvm-pool-size %d: at most %d VMs, and a pool of 0 or more",
			m.MaxConcurrent, m.PoolSize, MaxMicroVMs)
	}
	// Acceleration auto boots one probe VM besides the tool runs: it gets a user of its own too.
	accounts := m.MaxConcurrent
	if m.Accel == "" || m.Accel == microvm.AccelAuto {
		accounts++
	}
	ids := make([]microvm.ID, 0, accounts)
	for i := range accounts {
		name := MicroVMUser(m.User, i)
		if err := checkMicroVMUser(name); err != nil {
			return nil, err
		}
		u, err := users.Manager{Root: o.Root, HostTools: o.HostTools}.Ensure(name, users.RoleMicroVM)
		if err != nil {
			return nil, fmt.Errorf("microVM user: %w", err)
		}
		if u.UID <= 0 || u.GID <= 0 || u.UID > math.MaxUint32 || u.GID > math.MaxUint32 {
			return nil, fmt.Errorf("microVM user %s has uid %d gid %d: not an unprivileged id", u.Name, u.UID, u.GID)
		}
		ids = append(ids, microvm.ID{UID: uint32(u.UID), GID: uint32(u.GID)}) //nolint:gosec // range checked above
	}
	runner, err := microvm.NewRunner(microvm.Config{
		Systemd: sd, Root: o.Root,
		QEMU: m.QEMU, Kernel: filepath.Join(m.Guest, "vmlinuz"), Initramfs: filepath.Join(m.Guest, "initramfs.cpio.gz"),
		WorkDir: m.WorkDir, IDs: ids, Accel: m.Accel,
		MemoryMiB: m.MemoryMiB, MemoryOverheadMiB: m.MemoryOverheadMiB, OutputCap: m.OutputCap,
		MaxConcurrent: m.MaxConcurrent, KVMProbeTimeout: m.KVMProbeTimeout,
		PoolSize: m.PoolSize, PoolShare: m.PoolShare, MaxIdle: m.MaxIdle, Log: log,
	})
	if err != nil {
		return nil, err
	}
	log.Info("host-local tool runs on", "users", MicroVMUser(m.User, 0)+"..", "vms", m.MaxConcurrent,
		"pool", m.PoolSize, "share", m.PoolShare)
	return runner, nil
}

// MaxMicroVMs bounds the VMs of one host, and so the users the agent creates for them.
const MaxMicroVMs = 64

// MicroVMUser is the user VM slot i runs as: base_i. The underscore keeps it outside every
// agent-<profile> name (a profile name is a DNS label).
func MicroVMUser(base string, i int) string { return base + "_" + strconv.Itoa(i) }

// checkMicroVMUser refuses a QEMU user name that a gateway could also be given: the shared
// Convenience user, or agent-<p> for any name p a profile may have. The default agent-microvm
// passes because microvm is a reserved profile name; the user registry keeps the roles apart
// as well.
func checkMicroVMUser(name string) error {
	if name == unit.SharedUser {
		return fmt.Errorf("--microvm-user %s is the user Convenience-mode gateways run as", name)
	}
	if p, ok := layout.ProfileOfUser(name); ok {
		return fmt.Errorf("--microvm-user %s is the user a profile named %s runs as; choose a name outside agent-<profile>, such as the default %s",
			name, p, DefaultMicroVMUser)
	}
	return nil
}

// DefaultReleaseFileRoot is the release drop folder: where an administrator puts tarballs that
// Releases name with file:// URLs (config/samples/release.yaml uses it).
const DefaultReleaseFileRoot = "/var/lib/gateway-operator/releases"

// Defaults of the host-local microVM path.
const (
	DefaultMicroVMUser    = "agent-microvm"
	DefaultMicroVMWorkDir = "/run/gateway-agent/microvm"
)

// lockHost makes sure one agent at a time drives a host: two would race on `current`.
func lockHost(h layout.Host) (func(), error) {
	dir := h.On(layout.AgentDir)
	if err := os.MkdirAll(dir, 0o755); err != nil { //nolint:gosec // /opt/agent is read by every gateway (DESIGN host layout)
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, ".agent.lock"), os.O_CREATE|os.O_RDWR, 0o600) //nolint:gosec // a fixed name in a root-owned folder
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another agent already drives the host at %s: %w", h.Root, err)
	}
	return func() { f.Close() }, nil
}

// systemdCheck fails while the host's systemd does not answer on the bus (the connection dials
// again on its own when systemd or the bus come back).
func systemdCheck(sd *systemd.Conn) healthz.Checker {
	return func(req *http.Request) error {
		ctx, cancel := context.WithTimeout(req.Context(), 2*time.Second)
		defer cancel()
		return sd.Ping(ctx)
	}
}
