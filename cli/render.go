package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/launcher"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

func newRenderCommand(o *options) *cobra.Command {
	var host, python string
	cmd := &cobra.Command{
		Use:   "render PROFILE --host HOST",
		Short: "Show the unit, drop-in, env file and command a host's agent would write and run, off-host",
		Long: `Render, without reaching the host, what its agent writes for a profile: the template unit,
the profile's drop-in and env file, and the command the launcher resolves, with the same code
the agent and the launcher run; then lint them for PYTHONPATH (set once, in the env file only).
It reads the profile's GatewayInstance for that host (what the agent applies), or the profile
and its Release when the profile does not select the host yet.

AGENT_CONFIG_HASH is left out: the agent computes it on the host, over its launcher too.`,
		Example: `  kubectl gateway render core --host edge-1
  kubectl gateway render core --host edge-1 --python /usr/local/bin/python3.12`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return o.render(args[0], host, python) },
	}
	cmd.Flags().StringVar(&host, "host", "", "the host (required)")
	cmd.Flags().StringVar(&python, "python", unit.DefaultPython, "the interpreter the host's agent runs gateways with (its --python)")
	_ = cmd.MarkFlagRequired("host")
	return cmd
}

func (o *options) render(profile, host, python string) error {
	p, err := layout.ForProfile(profile)
	if err != nil {
		return err
	}
	if err := v1.ValidateHostName(host); err != nil {
		return err
	}
	cl, err := o.client()
	if err != nil {
		return err
	}
	ctx, cancel := o.ctx()
	defer cancel()
	var settings v1.GatewaySettings
	var rel v1.ReleaseSummary
	source, digest := "", ""
	var gi v1.GatewayInstance
	switch err := cl.Get(ctx, client.ObjectKey{Name: v1.InstanceName(profile, host)}, &gi); {
	case err == nil:
		settings = gi.Spec.GatewaySettings
		if gi.Spec.Material != nil {
			digest = gi.Spec.Material.Digest
		}
		rel = v1.ReleaseSummary{Name: gi.Spec.Release.Name, Label: gi.Spec.Release.Label, SHA256: gi.Spec.Release.SHA256}
		source = "gatewayinstance/" + gi.Name
	case apierrors.IsNotFound(err):
		var gp v1.GatewayProfile
		if err := cl.Get(ctx, client.ObjectKey{Name: profile}, &gp); err != nil {
			return explain(err, "get gatewayprofile "+profile)
		}
		var r v1.Release
		if err := cl.Get(ctx, client.ObjectKey{Name: gp.Spec.Release}, &r); err != nil {
			return explain(err, "get release "+gp.Spec.Release)
		}
		settings = gp.Spec.GatewaySettings
		if gp.Status.Material != nil {
			digest = gp.Status.Material.Digest
		}
		rel = v1.ReleaseSummary{Name: r.Name, Label: r.Spec.Label, SHA256: r.Spec.SHA256}
		source = "gatewayprofile/" + profile + " (it does not select " + host + " yet)"
	default:
		return explain(err, "get gatewayinstance "+v1.InstanceName(profile, host))
	}
	s := unit.FromSpec(p, settings, python)
	template, dropIn := unit.Template(), unit.DropIn(s)
	env, err := renderEnv(s, settings, digest)
	if err != nil {
		return fmt.Errorf("the agent would refuse this profile: %w", err)
	}
	releaseDir := layout.ReleaseDir(rel.SHA256, rel.Label)
	argv, err := launcher.Argv(string(s.Mode), s.Exec, s.Python, releaseDir)
	if err != nil {
		return fmt.Errorf("the launcher would refuse to start: %w", err)
	}
	w := o.Out
	fmt.Fprintf(w, "# %s on host %s, from %s, release %s (sha256 %s)\n\n", profile, host, source, rel.Label, rel.SHA256)
	for _, f := range []struct{ path, text string }{
		{layout.UnitDir + "/" + layout.TemplateUnit, template},
		{p.DropIn, dropIn},
		{p.Env, env},
	} {
		fmt.Fprintf(w, "# ---- %s\n%s\n", f.path, f.text)
	}
	fmt.Fprintf(w, "# ---- the launcher runs, in %s (%s -> %s):\n%s\n\n", releaseDir, p.Current, releaseDir, launcher.Command(argv))
	problems := lintPythonPath(template, dropIn, env)
	if len(problems) == 0 {
		fmt.Fprintln(w, "# PYTHONPATH lint: ok: no unit file sets it; the env file declares it once, as the profile's own current link")
		return nil
	}
	for _, pr := range problems {
		fmt.Fprintln(w, "# PYTHONPATH lint: "+pr)
	}
	return fmt.Errorf("PYTHONPATH lint failed")
}

// renderEnv renders the env file as the agent would, with placeholders for secret values
// (unit.FromSpec), the material digest, and a comment naming each envFrom Secret and file,
// whose keys and contents only the host reads.
func renderEnv(s unit.Settings, settings v1.GatewaySettings, digest string) (string, error) {
	if digest == "" && settings.UsesMaterial() {
		digest = "<digest of the material, not resolved yet>"
	}
	s.MaterialDigest = digest
	env, err := unit.EnvFile(s)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(env)
	for _, e := range settings.EnvFrom {
		fmt.Fprintf(&b, "# <every key of secret %s, as a variable", e.SecretRef.Name)
		if e.Prefix != "" {
			fmt.Fprintf(&b, " prefixed %s", e.Prefix)
		}
		b.WriteString(">\n")
	}
	for _, f := range settings.Files {
		mode := v1.DefaultFileMode
		if f.Mode != nil {
			mode = *f.Mode
		}
		switch {
		case f.SecretKeyRef != nil:
			fmt.Fprintf(&b, "# file $AGENT_HOME/%s, mode %#o: <from secret %s key %s>\n", f.Path, mode, f.SecretKeyRef.Name, f.SecretKeyRef.Key)
		case f.ConfigMapKeyRef != nil:
			fmt.Fprintf(&b, "# file $AGENT_HOME/%s, mode %#o: <from configmap %s key %s>\n", f.Path, mode, f.ConfigMapKeyRef.Name, f.ConfigMapKeyRef.Key)
		}
	}
	return b.String(), nil
}

// lintPythonPath checks the rule of the host layout: units and drop-ins never set PYTHONPATH,
// and the env file declares it exactly once.
func lintPythonPath(template, dropIn, env string) []string {
	var problems []string
	if unit.SetsPythonPath(template) {
		problems = append(problems, "the template unit sets PYTHONPATH")
	}
	if unit.SetsPythonPath(dropIn) {
		problems = append(problems, "the drop-in sets PYTHONPATH")
	}
	n := 0
	for _, line := range strings.Split(env, "\n") {
		if strings.HasPrefix(line, unit.EnvPythonPath+"=") {
			n++
		}
	}
	if n != 1 {
		problems = append(problems, fmt.Sprintf("the env file declares PYTHONPATH %d times", n))
	}
	return problems
}
