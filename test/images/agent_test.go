package images_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// capabilityNames lists the capabilities by number.
var capabilityNames = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
	"CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
	"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
	"CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
	"CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
	"CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
	"CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
}

// privilegedCapabilities is what a privileged container holds: every capability of the
// runtime's own bounding set.
func privilegedCapabilities(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			var caps []string
			for i, name := range capabilityNames {
				if mask&(1<<i) != 0 {
					caps = append(caps, name)
				}
			}
			return caps
		}
	}
	t.Fatal("no CapBnd in /proc/self/status")
	return nil
}

// hostPaths maps each hostPath volume config/nodeagent/daemonset.yaml may name to where that
// path of the sandboxed host is reached from this machine. A volume not listed fails the
// test: a new mount in the manifest needs a decision here.
func hostPaths(h *systemdhost.Host) map[string]string {
	return map[string]string{
		"/":                   h.Root,
		"/etc/systemd/system": filepath.Join(h.Root, "etc/systemd/system"),
		"/opt/agent":          filepath.Join(h.Root, "opt/agent"),
		// The sandbox's /run is a tmpfs of its own mount namespace, which no bind mount from
		// here reaches; the agent dials the bus through /proc/1/root instead (see below).
		"/run/dbus": "",
	}
}

// TestAgentImageDrivesASystemdHost runs the agent image under runc as the DaemonSet does — its
// command and arguments, root and privileged, in the host's PID namespace, with the host's
// root, unit folder and /opt/agent mounted where the manifest mounts them — beside the manager
// image, against a sandboxed systemd host: the agent registers the host and applies a
// Production profile, which gets Aligned and Isolated (the exposure score measured by the
// host's own systemd-analyze, chrooted, as --host-tools asks).
//
// What differs from a node, and why: a kubeconfig file instead of the service-account token;
// the machine's network (the API server listens on its loopback); the sandbox's /usr, which
// the sandbox itself mounts from the machine, mounted again under /host; and the system bus,
// reached through the shared PID namespace at /proc/1/root/run/dbus instead of a mount.
func TestAgentImageDrivesASystemdHost(t *testing.T) {
	runc := requireRunc(t)
	cp, admin := cluster(t)
	runManager(t, runc, cp)
	const hostName = "node-img"
	h := systemdhost.Start(t, systemdhost.Options{Name: hostName})

	dir, _ := buildOnce(t)
	img := image(t, filepath.Join(dir, "agent"))
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	pod, ctr := container(t, "config/nodeagent/daemonset.yaml")
	bundle := t.TempDir()
	if err := os.Mkdir(filepath.Join(bundle, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	unpack(t, img, filepath.Join(bundle, "rootfs"))
	kc, err := cp.Kubeconfig(t.TempDir(), "system:gateway-agent:"+hostName, "system:gateway-agents")
	if err != nil {
		t.Fatal(err)
	}

	if !pod.HostPID || ctr.SecurityContext == nil || ctr.SecurityContext.Privileged == nil || !*ctr.SecurityContext.Privileged {
		t.Fatalf("the DaemonSet is no longer privileged in the host's PID namespace; this test runs it so")
	}
	spec := baseSpec(hostName, false)
	spec.Process.User = processUser(t, cf)
	spec.Process.Env = cf.Config.Env
	caps := privilegedCapabilities(t)
	spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
	// hostPID: the sandboxed host's PID namespace, where its systemd is PID 1.
	spec.Linux.Namespaces = slices.DeleteFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == specs.PIDNamespace })
	spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.PIDNamespace, Path: fmt.Sprintf("/proc/%d/ns/pid", h.PID)})

	sources := hostPaths(h)
	volumes := map[string]string{}
	for _, v := range pod.Volumes {
		if v.HostPath == nil {
			t.Fatalf("volume %s is not a hostPath; this test knows only hostPath volumes", v.Name)
		}
		src, ok := sources[v.HostPath.Path]
		if !ok {
			t.Fatalf("the DaemonSet mounts the host's %s, which this test does not map to the sandboxed host", v.HostPath.Path)
		}
		volumes[v.Name] = src
	}
	for _, m := range ctr.VolumeMounts {
		src := volumes[m.Name]
		if src == "" {
			continue
		}
		if err := os.MkdirAll(src, 0o755); err != nil { // DirectoryOrCreate
			t.Fatal(err)
		}
		opts := []string{"rbind", "rw"}
		if m.ReadOnly {
			opts[1] = "ro"
		}
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: m.MountPath, Type: "bind", Source: src, Options: opts})
	}
	spec.Mounts = append(spec.Mounts,
		specs.Mount{Destination: "/host/usr", Type: "bind", Source: "/usr", Options: []string{"rbind", "ro"}},
		specs.Mount{Destination: "/etc/gateway-operator/kubeconfig", Type: "bind", Source: kc, Options: []string{"bind", "ro"}})

	args := make([]string, 0, len(ctr.Args)+4)
	for _, a := range ctr.Args {
		args = append(args, strings.ReplaceAll(a, "$(NODE_NAME)", hostName))
	}
	if v, _ := argValue(args, "dbus-address"); v != "unix:path=/host/run/dbus/system_bus_socket" {
		t.Fatalf("the DaemonSet's bus address is %q; this test reaches the bus another way and must follow", v)
	}
	args = setArg(args, "dbus-address", "unix:path=/proc/1/root/run/dbus/system_bus_socket")
	args = setArg(args, "metrics-bind-address", "0")
	args = setArg(args, "health-probe-bind-address", "127.0.0.1:"+strconv.Itoa(freePort(t)))
	args = append(args, "--kubeconfig=/etc/gateway-operator/kubeconfig", "--heartbeat-interval=5s")
	spec.Process.Args = append(slices.Clone(ctr.Command), args...)
	r := start(t, runc, "agent", bundle, spec)

	waitFor(t, r, "the agent in the container to register its host", func() bool {
		var gh v1.GatewayHost
		err := cp.Client.Get(t.Context(), client.ObjectKey{Name: hostName}, &gh)
		return err == nil && meta.IsStatusConditionTrue(gh.Status.Conditions, v1.ConditionReachable)
	})

	rel := agentruntime.MustBuild(t, agentruntime.Options{Version: "image-test"})
	url := agentruntime.Serve(t).Add("runtime.tar.gz", rel.Data)
	kubectl(t, cp, admin, fmt.Sprintf(`apiVersion: gateway.agent.dev/v1alpha1
kind: Release
metadata: {name: runtime-image-test}
spec: {source: {url: %q}, sha256: %s, label: %s}
---
apiVersion: gateway.agent.dev/v1alpha1
kind: GatewayProfile
metadata: {name: core}
spec:
  release: runtime-image-test
  nodeSelector: {}
  mode: cli
  isolation: Production
  egressAllowlist: [localhost]
`, url, rel.SHA256, rel.Label), "apply", "-f", "-")

	var gi v1.GatewayInstance
	waitFor(t, r, "core to be aligned and isolated on "+hostName, func() bool {
		err := cp.Client.Get(t.Context(), client.ObjectKey{Name: "core." + hostName}, &gi)
		return err == nil && meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionAligned) &&
			meta.IsStatusConditionTrue(gi.Status.Conditions, v1.ConditionIsolated)
	})
	if c := meta.FindStatusCondition(gi.Status.Conditions, v1.ConditionIsolated); c != nil {
		t.Logf("Isolated: %s", c.Message)
	}
}
