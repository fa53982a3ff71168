package images_test

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

const managerUser = "system:serviceaccount:gateway-operator-system:gateway-operator-manager"

// TestManagerImageRuns starts the manager image with runc as config/manager/manager.yaml asks
// (its command and arguments, its non-root user, no capabilities, no privilege escalation, a
// read-only root) against a real API server: it becomes the leader and reconciles a profile.
func TestManagerImageRuns(t *testing.T) {
	runc := requireRunc(t)
	cp, admin := cluster(t)
	r, user := runManager(t, runc, cp)

	// It runs as the image's user, not root.
	status, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(r.pid(t)), "status"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "Uid:\t" + strconv.Itoa(int(user.UID)); !strings.Contains(string(status), want) {
		t.Errorf("the manager's process status lacks %q:\n%s", want, status)
	}
	kubectl(t, cp, admin, "", "apply", "-f", "config/samples/release.yaml", "-f", "config/samples/profile_core.yaml")
	var p v1.GatewayProfile
	waitFor(t, r, "the profile to be reconciled", func() bool {
		err := cp.Client.Get(t.Context(), client.ObjectKey{Name: "core"}, &p)
		return err == nil && p.Status.ObservedGeneration == p.Generation && meta.FindStatusCondition(p.Status.Conditions, v1.ConditionReady) != nil
	})
}

// cluster starts a control plane with the operator's namespace, RBAC and admission policies
// from config/, and returns it with an administrator's kubeconfig.
func cluster(t *testing.T) (*controlplane.Env, string) {
	t.Helper()
	cp, err := controlplane.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Error(err)
		}
	})
	admin, err := cp.Kubeconfig(t.TempDir(), "gateway-admin", "system:masters")
	if err != nil {
		t.Fatal(err)
	}
	kubectl(t, cp, admin, "", "apply", "-f", "config/manager/namespace.yaml")
	kubectl(t, cp, admin, "", "apply", "-k", "config/rbac")
	kubectl(t, cp, admin, "", "apply", "-k", "config/policies")
	return cp, admin
}

// kubectl runs the control plane's kubectl from the repository's root, with stdin.
func kubectl(t *testing.T, cp *controlplane.Env, kubeconfig, stdin string, args ...string) {
	t.Helper()
	root, err := repo.Path(".")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cp.Kubectl(), append([]string{"--kubeconfig=" + kubeconfig}, args...)...) //nolint:gosec // the control plane's kubectl
	cmd.Dir = root
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// runManager starts the manager image as config/manager/manager.yaml runs it and waits until
// it leads. Only what a pod gets from the cluster differs: a kubeconfig file instead of the
// service account token, the lease namespace the pod would know, and the host's network with
// the ports moved off the manifest's, so that runs on one machine do not collide.
func runManager(t *testing.T, runc string, cp *controlplane.Env) (*runtime, specs.User) {
	t.Helper()
	dir, _ := buildOnce(t)
	img := image(t, filepath.Join(dir, "manager"))
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	pod, ctr := container(t, "config/manager/manager.yaml")
	bundle := t.TempDir()
	if err := os.Mkdir(filepath.Join(bundle, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	unpack(t, img, filepath.Join(bundle, "rootfs"))
	user := processUser(t, cf)
	kc, err := cp.Kubeconfig(t.TempDir(), managerUser)
	if err != nil {
		t.Fatal(err)
	}
	// Readable by the container's user only, as a projected token would be.
	if err := os.Chown(kc, int(user.UID), int(user.GID)); err != nil {
		t.Fatal(err)
	}

	sc := ctr.SecurityContext
	podSC := pod.SecurityContext
	if podSC == nil || podSC.RunAsNonRoot == nil || !*podSC.RunAsNonRoot || user.UID == 0 {
		t.Fatalf("the manifest asks for runAsNonRoot and the image's user is %d: the pod would not start", user.UID)
	}
	if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || sc.ReadOnlyRootFilesystem == nil {
		t.Fatalf("the manifest's manager container security context is %+v; this test gives it no capabilities and a read-only root", sc)
	}
	if !slices.Contains(ctr.Args, "--leader-elect") {
		t.Fatalf("the manifest does not elect a leader: %q", ctr.Args)
	}
	args := slices.Clone(ctr.Args)
	args = setArg(args, "metrics-bind-address", "0")
	args = setArg(args, "health-probe-bind-address", "127.0.0.1:"+strconv.Itoa(freePort(t)))
	args = append(args, "--kubeconfig=/etc/gateway-operator/kubeconfig", "--leader-election-namespace=gateway-operator-system")

	spec := baseSpec("gateway-manager-under-test", *sc.ReadOnlyRootFilesystem)
	spec.Process.User = user
	spec.Process.Args = append(slices.Clone(ctr.Command), args...)
	spec.Process.Env = cf.Config.Env
	spec.Process.NoNewPrivileges = sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation
	spec.Process.Capabilities = &specs.LinuxCapabilities{Bounding: []string{}, Effective: []string{}, Permitted: []string{}, Inheritable: []string{}, Ambient: []string{}}
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/etc/gateway-operator/kubeconfig", Type: "bind", Source: kc, Options: []string{"bind", "ro"}})
	if !spec.Process.NoNewPrivileges || !spec.Root.Readonly {
		t.Fatalf("the manifest lets the manager escalate privileges or write its root: %+v", sc)
	}
	r := start(t, runc, "manager", bundle, spec)

	var lease coordinationv1.Lease
	waitFor(t, r, "the manager in the container to become leader", func() bool {
		err := cp.Client.Get(t.Context(), client.ObjectKey{Namespace: "gateway-operator-system", Name: "gateway-operator.gateway.agent.dev"}, &lease)
		return err == nil && lease.Spec.HolderIdentity != nil && strings.HasPrefix(*lease.Spec.HolderIdentity, "gateway-manager-under-test_")
	})
	return r, user
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port
}

// waitFor polls cond for up to two minutes, and fails at once if the container exits.
func waitFor(t *testing.T, r *runtime, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		select {
		case <-r.done:
			t.Fatalf("the container exited while waiting for %s:\n%s", what, r.out.String())
		case <-time.After(250 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}
