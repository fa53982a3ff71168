package images_test

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/go-logr/logr"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/yaml"

	"github.com/agent-gateway/gateway-operator/test/images"
	"github.com/agent-gateway/gateway-operator/test/repo"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// built is one run of hack/images, shared by the tests of this package.
var built struct {
	once  sync.Once
	dir   string
	lines []string
	err   error
}

func buildOnce(t *testing.T) (string, []string) {
	t.Helper()
	built.once.Do(func() {
		built.dir, built.err = os.MkdirTemp("", "gateway-images-")
		if built.err == nil {
			built.lines, built.err = images.Build(built.dir)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.dir, built.lines
}

func TestMain(m *testing.M) {
	logf.SetLogger(logr.Discard())
	code := systemdhost.RunWithLeakCheck(m)
	if built.dir != "" {
		_ = os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// image loads the one image of an OCI layout hack/images wrote.
func image(t *testing.T, dir string) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Manifests) != 1 {
		t.Fatalf("%s holds %d manifests, want 1", dir, len(m.Manifests))
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestImagesAreReproducible builds the images twice: the digests, the SBOMs and the
// kustomization's image overrides are the same byte for byte (its path to config/default
// depends on the output folder).
func TestImagesAreReproducible(t *testing.T) {
	first, lines := buildOnce(t)
	second := t.TempDir()
	again, err := images.Build(second)
	if err != nil {
		t.Fatal(err)
	}
	names, err := images.Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(lines) != 2 || !strings.HasPrefix(lines[0], names.ManagerRef()+"@sha256:") || !strings.HasPrefix(lines[1], names.AgentRef()+"@sha256:") {
		t.Fatalf("hack/images printed %q, want the manager's and the agent's name:tag@digest", lines)
	}
	if !slices.Equal(lines, again) {
		t.Errorf("two builds gave different digests:\n%q\n%q", lines, again)
	}
	for _, f := range []string{"manager.spdx.json", "agent.spdx.json", "kustomization.yaml"} {
		a, err1 := os.ReadFile(filepath.Join(first, f))
		b, err2 := os.ReadFile(filepath.Join(second, f))
		if err := errors.Join(err1, err2); err != nil {
			t.Fatal(err)
		}
		if f == "kustomization.yaml" {
			_, a, _ = bytes.Cut(a, []byte("\nimages:\n"))
			_, b, _ = bytes.Cut(b, []byte("\nimages:\n"))
		}
		if len(a) == 0 || !bytes.Equal(a, b) {
			t.Errorf("%s differs between two builds", f)
		}
	}
}

// TestImageContents checks what a cluster relies on: the manager runs as a non-root user, the
// agent image holds both host binaries, every binary is static, and every layer entry is
// root-owned with the one source time, in name order.
func TestImageContents(t *testing.T) {
	dir, _ := buildOnce(t)
	for _, c := range []struct {
		key, user  string
		entrypoint string
		binaries   []string
	}{
		{"manager", "65532:65532", "/manager", []string{"manager"}},
		{"agent", "0:0", "/usr/local/bin/gateway-nodeagent", []string{"usr/local/bin/gateway-nodeagent", "usr/local/bin/gateway-launch"}},
	} {
		img := image(t, filepath.Join(dir, c.key))
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cf.Config.User != c.user || !slices.Equal(cf.Config.Entrypoint, []string{c.entrypoint}) {
			t.Errorf("%s: user %q entrypoint %q, want %q and %q", c.key, cf.Config.User, cf.Config.Entrypoint, c.user, c.entrypoint)
		}
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		found := map[string]bool{}
		for _, l := range layers {
			rc, err := l.Uncompressed()
			if err != nil {
				t.Fatal(err)
			}
			tr := tar.NewReader(rc)
			prev := ""
			for {
				h, err := tr.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if h.Name <= prev || h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(cf.Created.Time) {
					t.Errorf("%s: entry %s (after %s) uid %d gid %d time %v: want sorted, root-owned, at %v", c.key, h.Name, prev, h.Uid, h.Gid, h.ModTime, cf.Created.Time)
				}
				prev = h.Name
				if slices.Contains(c.binaries, h.Name) {
					found[h.Name] = true
					b, err := io.ReadAll(tr)
					if err != nil {
						t.Fatal(err)
					}
					f, err := elf.NewFile(bytes.NewReader(b))
					if err != nil {
						t.Fatalf("%s: %s: %v", c.key, h.Name, err)
					}
					for _, p := range f.Progs {
						if p.Type == elf.PT_INTERP {
							t.Errorf("%s: %s is dynamically linked", c.key, h.Name)
						}
					}
				}
			}
			_ = rc.Close()
		}
		for _, b := range c.binaries {
			if !found[b] {
				t.Errorf("%s: no %s in the image", c.key, b)
			}
		}
	}
}

// TestSBOM checks each image's SPDX document: it describes the image by its digest and lists
// the Go modules compiled into its binaries, with the standard library.
func TestSBOM(t *testing.T) {
	dir, lines := buildOnce(t)
	for i, c := range []struct{ key, module string }{
		{"manager", "sigs.k8s.io/controller-runtime"},
		{"agent", "github.com/coreos/go-systemd/v22"},
	} {
		b, err := os.ReadFile(filepath.Join(dir, c.key+".spdx.json"))
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Version  string `json:"spdxVersion"`
			Packages []struct {
				Name      string `json:"name"`
				Version   string `json:"versionInfo"`
				Checksums []struct {
					Value string `json:"checksumValue"`
				} `json:"checksums"`
			} `json:"packages"`
			Relationships []struct {
				Type string `json:"relationshipType"`
			} `json:"relationships"`
		}
		if err := json.Unmarshal(b, &doc); err != nil {
			t.Fatal(err)
		}
		_, digest, _ := strings.Cut(lines[i], "@sha256:")
		if doc.Version != "SPDX-2.3" || len(doc.Packages) == 0 || len(doc.Packages[0].Checksums) != 1 || doc.Packages[0].Checksums[0].Value != digest {
			t.Errorf("%s: SBOM does not describe the image %s first", c.key, digest)
		}
		have := map[string]string{}
		for _, p := range doc.Packages {
			have[p.Name] = p.Version
		}
		if have[c.module] == "" || !strings.HasPrefix(have["stdlib"], "go1.") {
			t.Errorf("%s: SBOM lacks %s or the Go standard library: %v", c.key, c.module, have)
		}
	}
}

// TestNamesAgree checks that config/ and the chart deploy the images config/images.env names.
func TestNamesAgree(t *testing.T) {
	names, err := images.Load()
	if err != nil {
		t.Fatal(err)
	}
	read := func(rel string, v any) {
		t.Helper()
		p, err := repo.Path(rel)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p) //nolint:gosec // a file of this repository
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(b, v); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
	}
	for rel, want := range map[string]string{
		"config/manager/manager.yaml":     names.ManagerRef(),
		"config/nodeagent/daemonset.yaml": names.AgentRef(),
	} {
		var obj struct {
			Spec struct {
				Template struct {
					Spec struct {
						Containers []struct{ Image string } `json:"containers"`
					} `json:"spec"`
				} `json:"template"`
			} `json:"spec"`
		}
		read(rel, &obj)
		for _, c := range obj.Spec.Template.Spec.Containers {
			if c.Image != want {
				t.Errorf("%s runs %s, want %s (config/images.env)", rel, c.Image, want)
			}
		}
	}
	var chart struct {
		AppVersion string `json:"appVersion"`
	}
	read("charts/gateway-operator/Chart.yaml", &chart)
	var values struct {
		Image struct{ Manager, Agent, Tag string } `json:"image"`
	}
	read("charts/gateway-operator/values.yaml", &values)
	if chart.AppVersion != names.Tag || values.Image.Tag != "" || values.Image.Manager != names.Manager || values.Image.Agent != names.Agent {
		t.Errorf("the chart deploys %s and %s at %q (appVersion %s), want config/images.env's %s and %s at %s",
			values.Image.Manager, values.Image.Agent, values.Image.Tag, chart.AppVersion, names.Manager, names.Agent, names.Tag)
	}
}
