package cli

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
)

// dropFolder is the node agent's default --release-file-root, the only folder a file:// URL
// may name a file in.
const dropFolder = "/var/lib/gateway-operator/releases"

func newReleaseCommand(o *options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "release",
		Short: "Pack a runtime folder into a release tarball, or check a tarball",
	}
	cmd.AddCommand(newPackCommand(o), newCheckCommand(o))
	return cmd
}

func newPackCommand(o *options) *cobra.Command {
	var label, url, name, out string
	cmd := &cobra.Command{
		Use:   "pack DIR --label LABEL [--url URL]",
		Short: "Pack a runtime folder into a deterministic release tarball and print its Release",
		Long: `Pack a runtime folder into a release tarball the node agent accepts.

The tarball is deterministic: entries sorted, every time fixed, owner root:root, folders 0755,
files 0755 or 0644. Devices, fifos, sockets, setuid files and symlinks leaving the folder are
refused. Before anything is written the tarball is unpacked with the agent's own code, so the
agent will accept it. The Release manifest is printed on stdout, ready for kubectl apply.`,
		Example: `  kubectl gateway release pack ./runtime --label 1.4.2 \
      --url https://releases.example.com/agent-runtime-1.4.2.tar.gz > release.yaml
  # copy agent-runtime-1.4.2.tar.gz to that URL, then:
  kubectl apply -f release.yaml`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.pack(args[0], label, url, name, out)
		},
	}
	cmd.Flags().StringVar(&label, "label", "", "release label, e.g. 1.4.2 (required)")
	cmd.Flags().StringVar(&url, "url", "", "where hosts will download the tarball (default file://"+dropFolder+"/NAME.tar.gz)")
	cmd.Flags().StringVar(&name, "name", "", "the Release's name (default agent-runtime-LABEL)")
	cmd.Flags().StringVarP(&out, "file", "f", "", "the tarball to write (default NAME.tar.gz)")
	_ = cmd.MarkFlagRequired("label")
	return cmd
}

// releaseName derives a Release name from a label: labels allow '_' and capitals, names do not.
func releaseName(label string) string {
	return "agent-runtime-" + strings.ToLower(strings.ReplaceAll(label, "_", "-"))
}

func (o *options) pack(dir, label, url, name, out string) error {
	if err := v1.ValidateReleaseLabel(label); err != nil {
		return err
	}
	if name == "" {
		name = releaseName(label)
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("release name %q: %s", name, strings.Join(errs, "; "))
	}
	if out == "" {
		out = name + ".tar.gz"
	}
	if url == "" {
		url = "file://" + dropFolder + "/" + filepath.Base(out)
	}
	p, err := release.Pack(dir)
	if err != nil {
		return fmt.Errorf("pack %s: %w", dir, err)
	}
	if err := writeFile(out, p.Data); err != nil {
		return err
	}
	rel := v1.Release{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1.GroupVersion.String(), Kind: "Release"},
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1.ReleaseSpec{Source: v1.ReleaseSource{URL: url}, SHA256: p.SHA256, Label: label},
	}
	manifest, err := releaseYAML(&rel)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.ErrOut, "wrote %s: %d bytes, %d entries, sha256 %s\n", out, len(p.Data), p.Entries, p.SHA256)
	if !p.CLI {
		fmt.Fprintf(o.ErrOut, "note: no %s: only profiles in script mode can run this release\n", release.CLIEntrypoint)
	}
	_, err = fmt.Fprintf(o.Out, "# sha256: %s\n%s", p.SHA256, manifest)
	return err
}

// releaseYAML renders a Release without the empty status and creationTimestamp a plain
// marshal would add.
func releaseYAML(rel *v1.Release) ([]byte, error) {
	b, err := yaml.Marshal(map[string]any{
		"apiVersion": rel.APIVersion, "kind": rel.Kind,
		"metadata": map[string]any{"name": rel.Name},
		"spec":     rel.Spec,
	})
	return b, err
}

// writeFile writes data next to path and renames it into place, so a failed pack never leaves
// half a tarball under the final name.
func writeFile(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func newCheckCommand(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "check FILE|DIR",
		Short: "Run the node agent's checks on a release tarball, or on a folder before packing it",
		Long: `Check a release tarball (or a folder, packed in memory first) exactly as the node agent
checks one: it is unpacked into a temporary folder with the agent's own code and removed again.`,
		Example: `  kubectl gateway release check agent-runtime-1.4.2.tar.gz
  kubectl gateway release check ./runtime`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return o.check(args[0]) },
	}
}

func (o *options) check(target string) error {
	fi, err := os.Stat(target)
	if err != nil {
		return err
	}
	var r io.Reader
	var sum string
	if fi.IsDir() {
		p, err := release.Pack(target)
		if err != nil {
			return fmt.Errorf("%s: refused: %w", target, err)
		}
		r, sum = bytes.NewReader(p.Data), p.SHA256
	} else {
		data, err := os.ReadFile(target) //nolint:gosec // the operator names the file to check
		if err != nil {
			return err
		}
		r, sum = bytes.NewReader(data), sha256Hex(data)
	}
	rep, err := release.Check(r)
	if err != nil {
		return fmt.Errorf("%s: refused: %w", target, err)
	}
	cli := "yes"
	if !rep.CLI {
		cli = "no (only script mode can run it)"
	}
	_, err = fmt.Fprintf(o.Out, "%s: accepted\n  sha256:  %s\n  files:   %d (%d bytes)\n  cli mode: %s %s\n",
		target, sum, rep.Files, rep.Bytes, release.CLIEntrypoint, cli)
	return err
}
