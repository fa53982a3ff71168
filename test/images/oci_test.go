package images_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/agent-gateway/gateway-operator/test/repo"
)

// requireRunc returns runc's path; hack/host-deps.sh installs it.
func requireRunc(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("runc")
	if err != nil {
		if os.Getenv("GATEWAY_TEST_REQUIRE_ALL") != "" || os.Getuid() == 0 {
			t.Fatal("runc is missing (hack/host-deps.sh installs it)")
		}
		t.Skip("runc is missing and this is not root")
	}
	return p
}

// unpack writes the image's flattened filesystem into dir, through an os.Root so that no
// entry can reach outside it.
func unpack(t *testing.T, img v1.Image, dir string) {
	t.Helper()
	root, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = root.Close() }()
	rc := mutate.Extract(img)
	defer func() { _ = rc.Close() }()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		name := path.Clean(h.Name)
		mode := fs.FileMode(h.Mode) & (fs.ModePerm | fs.ModeSticky)
		if h.Mode&0o1000 != 0 {
			mode |= fs.ModeSticky
		}
		switch h.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			f, err := root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(f, tr) //nolint:gosec // our own images' binaries
			if err := errors.Join(err, f.Close()); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("unexpected entry %s of type %c", h.Name, h.Typeflag)
		}
		if err := errors.Join(root.Chmod(name, mode), root.Lchown(name, h.Uid, h.Gid)); err != nil {
			t.Fatal(err)
		}
	}
}

// container reads the one container of a Deployment or DaemonSet manifest under config/.
func container(t *testing.T, rel string) (corev1.PodSpec, corev1.Container) {
	t.Helper()
	p, err := repo.Path(rel)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p) //nolint:gosec // a file of this repository
	if err != nil {
		t.Fatal(err)
	}
	var obj appsv1.Deployment // a DaemonSet's pod template reads the same
	if err := yaml.Unmarshal(b, &obj); err != nil {
		t.Fatal(err)
	}
	pod := obj.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%s has %d containers, want 1", rel, len(pod.Containers))
	}
	return pod, pod.Containers[0]
}

// processUser is the image's user, which must be numeric (a cluster checks runAsNonRoot
// against it without reading the image's passwd).
func processUser(t *testing.T, cf *v1.ConfigFile) specs.User {
	t.Helper()
	u, g, ok := strings.Cut(cf.Config.User, ":")
	uid, err1 := strconv.ParseUint(u, 10, 32)
	gid, err2 := strconv.ParseUint(g, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		t.Fatalf("image user %q is not uid:gid", cf.Config.User)
	}
	return specs.User{UID: uint32(uid), GID: uint32(gid)}
}

// runtime is one container started with runc, removed at the end of the test.
type runtime struct {
	runc, state, id string
	cmd             *exec.Cmd
	out             *bytes.Buffer
	done            chan struct{}
}

// start writes spec into bundle/config.json and runs it. runc's state and the container's
// cgroup (one level, named after the container) are the test's own and go away in its
// cleanup.
func start(t *testing.T, runc, name, bundle string, spec *specs.Spec) *runtime {
	t.Helper()
	id := fmt.Sprintf("gateway-image-test-%s-%d", name, os.Getpid())
	spec.Linux.CgroupsPath = "/" + id
	b, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	r := &runtime{runc: runc, state: t.TempDir(), id: id, out: &bytes.Buffer{}, done: make(chan struct{})}
	r.cmd = exec.Command(runc, "--root", r.state, "run", "--bundle", bundle, r.id) //nolint:gosec // runc from PATH, our bundle
	r.cmd.Stdout, r.cmd.Stderr = r.out, r.out
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	t.Cleanup(func() {
		_ = exec.Command(runc, "--root", r.state, "kill", r.id, "KILL").Run() //nolint:gosec // see above
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			_ = r.cmd.Process.Kill()
			<-r.done
		}
		_ = exec.Command(runc, "--root", r.state, "delete", "--force", r.id).Run() //nolint:gosec // see above
		if left, _ := filepath.Glob("/sys/fs/cgroup/*/" + r.id); len(left) > 0 {
			t.Errorf("runc left the container's cgroups behind: %v", left)
		}
		if t.Failed() {
			t.Logf("output of the %s container:\n%s", name, r.out.String())
		}
	})
	return r
}

// pid is the container's init process as the host sees it.
func (r *runtime) pid(t *testing.T) int {
	t.Helper()
	out, err := exec.Command(r.runc, "--root", r.state, "state", r.id).Output() //nolint:gosec // see start
	if err != nil {
		t.Fatalf("runc state: %v", err)
	}
	var st struct {
		Pid    int    `json:"pid"`
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatal(err)
	}
	return st.Pid
}

// baseSpec is what every container here gets: its own PID, mount, IPC and UTS namespaces,
// /proc, and a /dev and /tmp on tmpfs.
func baseSpec(hostname string, root bool) *specs.Spec {
	return &specs.Spec{
		// Debian 12's runc speaks 1.0 of the runtime spec, which this uses no more of.
		Version:  "1.0.2",
		Hostname: hostname,
		Root:     &specs.Root{Path: "rootfs", Readonly: root},
		Process:  &specs.Process{Cwd: "/"},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}},
		},
	}
}

// argValue returns the value of --name= in args.
func argValue(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// setArg replaces --name=... in args, or appends it.
func setArg(args []string, name, value string) []string {
	out := make([]string, 0, len(args)+1)
	for _, a := range args {
		if !strings.HasPrefix(a, "--"+name+"=") {
			out = append(out, a)
		}
	}
	return append(out, "--"+name+"="+value)
}
