// Command gateway-nodeagent runs on every gateway host: it registers the host, watches the host's
// GatewayInstances and applies them to systemd. `gateway-nodeagent bootstrap` gives a bare-metal
// host its identity with a bootstrap token.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	// Release downloads over https need root certificates; the agent's image carries none, so
	// the agent falls back to these when the system has no bundle.
	_ "golang.org/x/crypto/x509roots/fallback"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/agent"
	"github.com/agent-gateway/gateway-operator/nodeagent/bootstrap"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

var version = "dev"

func main() {
	if len(os.Args) > 1 && os.Args[1] == "bootstrap" {
		os.Exit(runBootstrap(os.Args[2:]))
	}
	hostname, _ := os.Hostname()
	self, _ := os.Executable()
	var o agent.Options
	var labels string
	flag.StringVar(&o.HostName, "host-name", hostname, "this host's GatewayHost name (a DNS label)")
	flag.StringVar(&labels, "host-labels", "", "extra labels the agent reports on its GatewayHost, as k=v,k2=v2; each key must start with reported.gateway.agent.dev/ (the labels profiles select on are set by an administrator)")
	flag.StringVar(&o.Root, "root", "/", "prefix under which the host's filesystem is reached")
	flag.StringVar(&o.BusAddress, "dbus-address", "", "D-Bus address of the host's system bus, e.g. unix:path=/run/dbus/system_bus_socket (required)")
	flag.BoolVar(&o.HostTools, "host-tools", false, "run the host's own systemd-analyze and useradd chrooted into --root (for the container image, which carries neither)")
	flag.StringVar(&o.ProcRoot, "proc-root", "/proc", "where the host's /proc is read")
	flag.StringVar(&o.Launcher, "launcher", filepath.Join(filepath.Dir(self), "gateway-launch"), "the launch binary to install on the host")
	flag.StringVar(&o.Python, "python", unit.DefaultPython, "the interpreter gateways run")
	flag.IntVar(&o.KeepReleases, "keep-releases", 5, "releases kept on disk per host")
	flag.StringVar(&o.ReleaseFileRoot, "release-file-root", agent.DefaultReleaseFileRoot, "the only folder file:// release URLs may name a file in (root-writable only); empty turns file:// off")
	flag.DurationVar(&o.HeartbeatInterval, "heartbeat-interval", 10*time.Second, "how often the host's heartbeat Lease is renewed")
	flag.StringVar(&o.LeaseNamespace, "lease-namespace", v1.DefaultHostLeaseNamespace, "namespace of the host's heartbeat Lease, named after the host (the manager's --host-lease-namespace); empty: heart-beat in the GatewayHost's status instead")
	flag.DurationVar(&o.StatusRefresh, "status-refresh", agent.DefaultStatusRefresh, "how long the GatewayHost's status goes unwritten while nothing in it changes")
	flag.DurationVar(&o.ProofTimeout, "proof-timeout", 30*time.Second, "how long a restarted gateway has to answer on its status endpoint")
	flag.IntVar(&o.ConcurrentApplies, "concurrent-applies", agent.DefaultConcurrentApplies, "profiles applied at once; a hung profile holds only one of these")
	flag.DurationVar(&o.ApplyTimeout, "apply-timeout", agent.DefaultApplyTimeout, "bound on one apply of one profile, download included")
	flag.DurationVar(&o.ReproveInterval, "reprove-interval", agent.DefaultReproveInterval, "backstop: how often each instance is proven again in full although no change on the host was seen")
	flag.StringVar(&o.MetricsAddr, "metrics-bind-address", ":8090", "metrics listen address; 0 turns metrics off")
	flag.StringVar(&o.ProbeAddr, "health-probe-bind-address", ":8091", "health probe listen address; 0 turns probes off")
	zopts := zap.Options{}
	flag.StringVar(&o.MicroVM.Guest, "microvm-guest", "", "folder with the tool-run microVM's vmlinuz and initramfs.cpio.gz (hack/microvm-guest.sh); empty turns host-local tool runs off")
	flag.StringVar(&o.MicroVM.QEMU, "microvm-qemu", "", "qemu-system-x86_64 binary (default: from PATH)")
	flag.StringVar(&o.MicroVM.User, "microvm-user", agent.DefaultMicroVMUser, "base name of the unprivileged system users QEMU runs as: VM slot i runs as <name>_<i>, created by the agent; an existing user it did not create, and any agent-<profile> name, is refused")
	flag.StringVar(&o.MicroVM.WorkDir, "microvm-work-dir", agent.DefaultMicroVMWorkDir, "folder on the host for per-run microVM files; keep it short")
	flag.StringVar(&o.MicroVM.Accel, "microvm-accel", "auto", "tcg, kvm, or auto: KVM once a probe VM has booted under it at start (QEMU's user must be able to open /dev/kvm), else TCG; the GatewayHost's capabilities say which and why")
	flag.IntVar(&o.MicroVM.MemoryMiB, "microvm-memory-mib", microvm.DefaultMemoryMiB, "guest RAM per tool run")
	flag.IntVar(&o.MicroVM.MemoryOverheadMiB, "microvm-memory-overhead-mib", microvm.DefaultMemoryOverheadMiB, "memory QEMU may use beyond the guest's RAM; each VM's transient unit gets MemoryMax = guest RAM + this")
	flag.IntVar(&o.MicroVM.OutputCap, "microvm-output-cap", microvm.DefaultOutputCap, "bytes of stdout and of stderr kept per tool run")
	flag.IntVar(&o.MicroVM.MaxConcurrent, "microvm-max-concurrent", 0, "tool-run microVMs that exist at once on this host, warm ones included, each as a user of its own (default: pool size + 1)")
	flag.IntVar(&o.MicroVM.PoolSize, "microvm-pool-size", 0, "pre-booted microVMs that wait for a tool run; each serves one run and is replaced (0: every run boots its own)")
	flag.IntVar(&o.MicroVM.PoolShare, "microvm-pool-share", 1, "warm microVMs one profile may hold at once; beyond it the profile's runs boot cold")
	flag.DurationVar(&o.MicroVM.MaxIdle, "microvm-max-idle", microvm.DefaultMaxIdle, "how long a warm microVM waits for a run before it is replaced by a fresh one")
	flag.StringVar(&o.ToolRuns.Route, "toolrun-route", agent.RouteAuto, "routes this host offers its gateways' tool runs (their $AGENT_HOME/run/toolrun.sock): auto (a profile's spec.toolRuns.route, else a host-local microVM when --microvm-guest is set, else the cluster), host (microVMs only) or cluster (ToolRuns only)")
	flag.StringVar(&o.ToolRuns.Namespace, "toolrun-namespace", agent.DefaultToolRunNamespace, "namespace of the ToolRuns the agent creates for the cluster route: the manager's --material-namespace, where it grants each host its ToolRun slots")
	flag.IntVar(&o.ToolRuns.HostPerProfile, "toolrun-host-per-profile", 1, "host-local tool runs one profile may have at once, warm or cold; more are refused (its warm ones are bounded by --microvm-pool-share too)")
	flag.DurationVar(&o.ToolRuns.Grace, "toolrun-grace", agent.DefaultToolRunGrace, "how long a cluster tool run may take beyond its own timeout (scheduling, image pull) before the agent gives up on it")
	zopts.BindFlags(flag.CommandLine)
	flag.Parse()
	o.Version = version

	log := zap.New(zap.UseFlagOptions(&zopts))
	ctrl.SetLogger(log)
	if o.BusAddress == "" {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent: --dbus-address is required (the agent never guesses which systemd to drive)")
		os.Exit(2)
	}
	if labels != "" {
		o.HostLabels = map[string]string{}
		for _, kv := range strings.Split(labels, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				fmt.Fprintf(os.Stderr, "gateway-nodeagent: --host-labels: %q is not k=v\n", kv)
				os.Exit(2)
			}
			o.HostLabels[k] = v
		}
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent:", err)
		os.Exit(1)
	}
	ctx := ctrl.SetupSignalHandler()
	// A kubeconfig written by `bootstrap` names one file as both client certificate and key:
	// the agent renews that certificate itself, and client-go reloads the file when it changes.
	if cfg.CertFile != "" && cfg.CertFile == cfg.KeyFile {
		r := &bootstrap.Renewer{Config: cfg, CertFile: cfg.CertFile, Host: o.HostName, Log: log.WithName("certificate")}
		go r.Run(ctx)
	}
	if err := agent.Run(ctx, cfg, o, log.WithValues("host", o.HostName)); err != nil {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent:", err)
		os.Exit(1)
	}
}

// runBootstrap is `gateway-nodeagent bootstrap`: it gets the host's client certificate with a
// bootstrap token and writes the agent's kubeconfig.
func runBootstrap(args []string) int {
	hostname, _ := os.Hostname()
	fs := flag.NewFlagSet("gateway-nodeagent bootstrap", flag.ContinueOnError)
	var o bootstrap.Options
	var caFile string
	fs.StringVar(&o.Token, "token", "", "bootstrap token ID.SECRET issued for this host (required; or GATEWAY_BOOTSTRAP_TOKEN)")
	fs.StringVar(&o.Server, "server", "", "the API server's https:// URL (required)")
	fs.StringVar(&caFile, "ca-file", "", "PEM CA bundle the API server's certificate is checked against (required)")
	fs.StringVar(&o.Host, "host", hostname, "this host's GatewayHost name (the host the token was issued for)")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "/etc/gateway-operator/kubeconfig", "the kubeconfig to write (0600)")
	fs.StringVar(&o.CertFile, "cert-file", "", "the client certificate and key file to write (0600; default: client.pem beside --kubeconfig)")
	fs.DurationVar(&o.Timeout, "timeout", bootstrap.DefaultTimeout, "how long to wait for the request to be approved and signed")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if o.Token == "" {
		// The environment keeps the token out of the process list.
		o.Token = os.Getenv("GATEWAY_BOOTSTRAP_TOKEN")
	}
	if o.Token == "" || o.Server == "" || caFile == "" {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent bootstrap: --token, --server and --ca-file are required")
		return 2
	}
	ca, err := os.ReadFile(caFile) //nolint:gosec // the administrator names the CA file on the command line
	if err != nil {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent bootstrap:", err)
		return 1
	}
	o.CAData = ca
	if err := bootstrap.Bootstrap(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "gateway-nodeagent bootstrap:", err)
		return 1
	}
	fmt.Printf("wrote %s for system:gateway-agent:%s\n", o.Kubeconfig, o.Host)
	return 0
}
