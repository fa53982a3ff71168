// Command images builds the operator's two OCI images without a container engine: the manager
// (a static binary run as a non-root user on an otherwise empty filesystem) and the node agent
// (gateway-nodeagent with gateway-launch beside it). Each image is written as an OCI image
// layout with an SPDX SBOM beside it, and a kustomization that deploys config/default with
// exactly these digests.
//
// The images are reproducible: binaries are built with -trimpath and no build ID, layers hold
// sorted entries with one fixed time and owner, and that time is the commit's (or
// SOURCE_DATE_EPOCH). Two builds of one commit give the same digests.
//
//	go run ./hack/images --out dist/images
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/buildinfo"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// NonRootUID is the user the manager runs as, as in distroless' "nonroot".
const NonRootUID = 65532

// spec is one image to build.
type spec struct {
	key        string // manager, agent: the folder and SBOM name under --out
	ref        string // name:tag
	user       string
	entrypoint []string
	binaries   map[string]string // path in the image -> command under cmd/
}

func main() {
	out := flag.String("out", "dist/images", "folder the image layouts, SBOMs and kustomization are written to")
	names := flag.String("config", "config/images.env", "file with MANAGER_IMAGE, AGENT_IMAGE and IMAGE_TAG")
	arch := flag.String("arch", "amd64", "GOARCH of the images")
	flag.Parse()
	if err := run(*out, *names, *arch); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func run(out, namesFile, arch string) error {
	names, err := readEnv(namesFile)
	if err != nil {
		return err
	}
	for _, k := range []string{"MANAGER_IMAGE", "AGENT_IMAGE", "IMAGE_TAG"} {
		if names[k] == "" {
			return fmt.Errorf("%s does not set %s", namesFile, k)
		}
	}
	tag := names["IMAGE_TAG"]
	specs := []spec{{
		key: "manager", ref: names["MANAGER_IMAGE"] + ":" + tag,
		user:       fmt.Sprintf("%d:%d", NonRootUID, NonRootUID),
		entrypoint: []string{"/manager"},
		binaries:   map[string]string{"manager": "manager"},
	}, {
		// The agent drives the host's systemd and creates the profiles' users: it runs as root
		// in a privileged pod (config/nodeagent/daemonset.yaml).
		key: "agent", ref: names["AGENT_IMAGE"] + ":" + tag,
		user:       "0:0",
		entrypoint: []string{"/usr/local/bin/gateway-nodeagent"},
		binaries: map[string]string{
			"usr/local/bin/gateway-nodeagent": "gateway-nodeagent",
			"usr/local/bin/gateway-launch":    "gateway-launch",
		},
	}}

	src, err := sourceOf()
	if err != nil {
		return err
	}
	binDir, err := os.MkdirTemp("", "gateway-images-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(binDir) }()
	if err := os.RemoveAll(out); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil { //nolint:gosec // images and SBOMs are public
		return err
	}
	var overrides []override
	for _, s := range specs {
		digest, err := s.build(out, binDir, arch, tag, src)
		if err != nil {
			return fmt.Errorf("%s: %w", s.key, err)
		}
		name, _, _ := strings.Cut(s.ref, ":")
		overrides = append(overrides, override{name: name, digest: digest})
		fmt.Printf("%s@%s\n", s.ref, digest)
	}
	return writeKustomization(out, overrides)
}

// build compiles the image's binaries, assembles and writes the image and its SBOM, and
// returns the image's digest.
func (s spec) build(out, binDir, arch, tag string, src source) (string, error) {
	files := map[string][]byte{}
	var infos []*debug.BuildInfo
	paths := sortedKeys(s.binaries)
	for _, p := range paths {
		bin, err := goBuild(binDir, s.binaries[p], arch, tag)
		if err != nil {
			return "", err
		}
		b, err := os.ReadFile(bin) //nolint:gosec // the binary just built into our temporary folder
		if err != nil {
			return "", err
		}
		files[p] = b
		info, err := buildinfo.ReadFile(bin)
		if err != nil {
			return "", err
		}
		infos = append(infos, info)
	}
	created := src.time
	base, err := layerOf(baseFiles(), created)
	if err != nil {
		return "", err
	}
	app, err := layerOf(binaryFiles(files), created)
	if err != nil {
		return "", err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	comment := map[string]string{"base": "passwd, group, tmp", "app": "binaries"}
	for _, l := range []struct {
		layer v1.Layer
		what  string
	}{{base, "base"}, {app, "app"}} {
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l.layer, History: v1.History{
			Created: v1.Time{Time: created}, CreatedBy: "hack/images: " + comment[l.what],
		}}); err != nil {
			return "", err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return "", err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = arch, "linux"
	cf.Created = v1.Time{Time: created}
	cf.Config = v1.Config{
		User:       s.user,
		Entrypoint: s.entrypoint,
		WorkingDir: "/",
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
		Labels: map[string]string{
			"org.opencontainers.image.source":   "https://github.com/agent-gateway/gateway-operator",
			"org.opencontainers.image.version":  tag,
			"org.opencontainers.image.revision": src.revision,
			"org.opencontainers.image.created":  created.Format(time.RFC3339),
		},
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return "", err
	}
	digest, err := img.Digest()
	if err != nil {
		return "", err
	}
	lp, err := layout.Write(filepath.Join(out, s.key), empty.Index)
	if err != nil {
		return "", err
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": s.ref,
	})); err != nil {
		return "", err
	}
	sbom, err := spdx(s, digest.String(), src, infos)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(out, s.key+".spdx.json"), sbom, 0o644); err != nil { //nolint:gosec // a public SBOM
		return "", err
	}
	return digest.String(), nil
}

// goBuild builds ./cmd/<command> as a static binary whose bytes depend only on the sources:
// no cgo, no file system paths, no build ID, no VCS stamp (the commit goes into the image's
// labels and SBOM instead, whatever GOFLAGS says).
func goBuild(dir, command, arch, tag string) (string, error) {
	bin := filepath.Join(dir, arch, command)
	ldflags := "-s -w -buildid="
	if command == "gateway-nodeagent" {
		ldflags += " -X main.version=" + tag
	}
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags="+ldflags, "-o", bin, "./cmd/"+command) //nolint:gosec // commands of this repository, named in this file
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/%s: %v\n%s", command, err, out)
	}
	return bin, nil
}

// source is the commit the images are built from and the one time every file and the image
// carry: SOURCE_DATE_EPOCH when set, else the commit's time (the epoch outside a git clone).
type source struct {
	revision string
	time     time.Time
}

func sourceOf() (source, error) {
	var src source
	if out, err := exec.Command("git", "log", "-1", "--format=%H %ct").Output(); err == nil {
		rev, ct, _ := strings.Cut(strings.TrimSpace(string(out)), " ")
		n, _ := strconv.ParseInt(ct, 10, 64)
		src = source{revision: rev, time: time.Unix(n, 0).UTC()}
	} else {
		src.time = time.Unix(0, 0).UTC()
	}
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return src, fmt.Errorf("SOURCE_DATE_EPOCH: %w", err)
		}
		src.time = time.Unix(n, 0).UTC()
	}
	return src, nil
}

// file is one entry of a layer.
type file struct {
	mode int64 // permission bits; a zero body and tar.TypeDir make a folder
	dir  bool
	body []byte
}

// baseFiles is what a distroless base holds that the binaries need: the users for
// runAsNonRoot to resolve, and a /tmp.
func baseFiles() map[string]file {
	return map[string]file{
		"etc":               {mode: 0o755, dir: true},
		"etc/passwd":        {mode: 0o644, body: fmt.Appendf(nil, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRootUID, NonRootUID)},
		"etc/group":         {mode: 0o644, body: fmt.Appendf(nil, "root:x:0:\nnonroot:x:%d:\n", NonRootUID)},
		"etc/nsswitch.conf": {mode: 0o644, body: []byte("hosts: files dns\n")},
		"tmp":               {mode: 0o1777, dir: true},
	}
}

// binaryFiles puts the binaries at their paths, with every parent folder.
func binaryFiles(bins map[string][]byte) map[string]file {
	out := map[string]file{}
	for p, b := range bins {
		out[p] = file{mode: 0o755, body: b}
		for d := filepath.Dir(p); d != "."; d = filepath.Dir(d) {
			out[d] = file{mode: 0o755, dir: true}
		}
	}
	return out
}

// layerOf writes files into a gzip-compressed tar in name order, every entry owned by root
// with the given time, and makes a layer of it.
func layerOf(files map[string]file, mtime time.Time) (v1.Layer, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	tw := tar.NewWriter(zw)
	for _, name := range sortedKeys(files) {
		f := files[name]
		h := &tar.Header{Name: name, Mode: f.mode, ModTime: mtime, Uname: "root", Gname: "root", Format: tar.FormatPAX}
		if f.dir {
			h.Typeflag, h.Name = tar.TypeDir, name+"/"
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.body); err != nil {
			return nil, err
		}
	}
	if err := errors.Join(tw.Close(), zw.Close()); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// readEnv reads KEY=VALUE lines, skipping blank lines and # comments.
func readEnv(path string) (map[string]string, error) {
	f, err := os.Open(path) //nolint:gosec // a file of this repository, named on the command line
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: not KEY=VALUE", path, n)
		}
		out[k] = v
	}
	return out, sc.Err()
}

type override struct{ name, digest string }

// writeKustomization writes a kustomization beside the images that deploys config/default with
// the images pinned to the digests just built: kubectl apply -k <out>.
func writeKustomization(out string, overrides []override) error {
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	cfg, err := filepath.Abs("config/default")
	if err != nil {
		return err
	}
	rel, err := filepath.Rel(abs, cfg)
	if err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# Written by make images: config/default with the images just built, by digest.\n")
	fmt.Fprintf(&b, "resources:\n- %s\nimages:\n", filepath.ToSlash(rel))
	for _, o := range overrides {
		fmt.Fprintf(&b, "- name: %s\n  digest: %s\n", o.name, o.digest)
	}
	return os.WriteFile(filepath.Join(out, "kustomization.yaml"), []byte(b.String()), 0o644) //nolint:gosec // a public manifest
}

// spdx writes an SPDX 2.3 document for one image: the image, each binary, and the Go modules
// and standard library compiled into them, from the binaries' own build information.
func spdx(s spec, digest string, src source, infos []*debug.BuildInfo) ([]byte, error) {
	type checksum struct {
		Algorithm string `json:"algorithm"`
		Value     string `json:"checksumValue"`
	}
	type ref struct {
		Category string `json:"referenceCategory"`
		Type     string `json:"referenceType"`
		Locator  string `json:"referenceLocator"`
	}
	type pkg struct {
		ID               string     `json:"SPDXID"`
		Name             string     `json:"name"`
		Version          string     `json:"versionInfo,omitempty"`
		Download         string     `json:"downloadLocation"`
		FilesAnalyzed    bool       `json:"filesAnalyzed"`
		Checksums        []checksum `json:"checksums,omitempty"`
		ExternalRefs     []ref      `json:"externalRefs,omitempty"`
		PrimaryPurpose   string     `json:"primaryPackagePurpose,omitempty"`
		LicenseConcluded string     `json:"licenseConcluded"`
		LicenseDeclared  string     `json:"licenseDeclared"`
		Copyright        string     `json:"copyrightText"`
	}
	type rel struct {
		From string `json:"spdxElementId"`
		Type string `json:"relationshipType"`
		To   string `json:"relatedSpdxElement"`
	}
	name, tag, _ := strings.Cut(s.ref, ":")
	hex := strings.TrimPrefix(digest, "sha256:")
	imageID := "SPDXRef-Image-" + s.key
	doc := struct {
		Version      string `json:"spdxVersion"`
		License      string `json:"dataLicense"`
		ID           string `json:"SPDXID"`
		Name         string `json:"name"`
		Namespace    string `json:"documentNamespace"`
		CreationInfo struct {
			Created  string   `json:"created"`
			Creators []string `json:"creators"`
		} `json:"creationInfo"`
		Packages      []pkg `json:"packages"`
		Relationships []rel `json:"relationships"`
	}{Version: "SPDX-2.3", License: "CC0-1.0", ID: "SPDXRef-DOCUMENT", Name: s.ref,
		Namespace: "https://github.com/agent-gateway/gateway-operator/spdx/" + s.key + "-" + hex}
	doc.CreationInfo.Created = src.time.Format(time.RFC3339)
	doc.CreationInfo.Creators = []string{"Tool: gateway-operator-hack-images"}
	noAssert := func(p pkg) pkg {
		p.LicenseConcluded, p.LicenseDeclared, p.Copyright = "NOASSERTION", "NOASSERTION", "NOASSERTION"
		if p.Download == "" {
			p.Download = "NOASSERTION"
		}
		return p
	}
	doc.Packages = append(doc.Packages, noAssert(pkg{ID: imageID, Name: name, Version: tag,
		Checksums:      []checksum{{"SHA256", hex}},
		ExternalRefs:   []ref{{"PACKAGE-MANAGER", "purl", "pkg:oci/" + filepath.Base(name) + "@" + strings.ReplaceAll(digest, ":", "%3A") + "?repository_url=" + filepath.Dir(name)}},
		PrimaryPurpose: "CONTAINER"}))
	doc.Relationships = append(doc.Relationships, rel{"SPDXRef-DOCUMENT", "DESCRIBES", imageID})
	seen := map[string]bool{}
	for i, info := range infos {
		binID := fmt.Sprintf("SPDXRef-Binary-%d", i)
		doc.Packages = append(doc.Packages, noAssert(pkg{ID: binID, Name: info.Path, Version: info.Main.Version,
			Download:       "git+https://github.com/agent-gateway/gateway-operator@" + src.revision,
			PrimaryPurpose: "APPLICATION",
			ExternalRefs:   []ref{{"PACKAGE-MANAGER", "purl", "pkg:golang/" + info.Path + "@" + info.Main.Version}}}))
		doc.Relationships = append(doc.Relationships, rel{imageID, "CONTAINS", binID})
		mods := []*debug.Module{{Path: "stdlib", Version: info.GoVersion}}
		for _, d := range info.Deps {
			if d.Replace != nil {
				d = d.Replace
			}
			mods = append(mods, d)
		}
		for _, m := range mods {
			id := "SPDXRef-Go-" + spdxID(m.Path+"-"+m.Version)
			if !seen[id] {
				seen[id] = true
				p := pkg{ID: id, Name: m.Path, Version: m.Version, PrimaryPurpose: "LIBRARY",
					ExternalRefs: []ref{{"PACKAGE-MANAGER", "purl", "pkg:golang/" + m.Path + "@" + m.Version}}}
				doc.Packages = append(doc.Packages, noAssert(p))
			}
			doc.Relationships = append(doc.Relationships, rel{binID, "DEPENDS_ON", id})
		}
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	return append(b, '\n'), err
}

// spdxID keeps the letters, digits, dots and dashes SPDX allows in an identifier.
func spdxID(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-':
			return r
		}
		return '-'
	}, s)
}
