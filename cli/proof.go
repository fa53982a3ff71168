package cli

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/runtime"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func newProofCommand(o *options) *cobra.Command {
	var out output
	var host string
	cmd := &cobra.Command{
		Use:   "proof PROFILE [--host HOST]",
		Short: "Show the alignment and isolation proof each host's agent read from the running gateway",
		Long: `Show, for each host of a profile (or one host), what the host's agent proved about the
running gateway: which process, which release and import path it runs, that no unit file sets
PYTHONPATH, that the siblings kept running, and each isolation check.`,
		Example: `  kubectl gateway proof core
  kubectl gateway proof core --host edge-1
  kubectl gateway proof core --host edge-1 -o json   # the GatewayInstance`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			f, err := o.load(args[0], false)
			if err != nil {
				return err
			}
			var list []v1.GatewayInstance
			for _, gi := range f.instances[args[0]] {
				if host == "" || gi.Spec.Host == host {
					list = append(list, gi)
				}
			}
			if host != "" && len(list) == 0 {
				return fmt.Errorf("profile %s does not run on host %s", args[0], host)
			}
			if out.structured() {
				objs := make([]runtime.Object, len(list))
				for i := range list {
					objs[i] = &list[i]
				}
				return out.print(o.Out, o.scheme, objs...)
			}
			if len(list) == 0 {
				fmt.Fprintf(o.Out, "Profile %s runs on no host yet.\n", args[0])
			}
			for i := range list {
				if i > 0 {
					fmt.Fprintln(o.Out)
				}
				o.printProof(&list[i], out.wide())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&host, "host", "", "only this host")
	out.add(cmd)
	return cmd
}

func mark(ok bool) string {
	if ok {
		return "ok"
	}
	return "FAILED"
}

func (o *options) printProof(gi *v1.GatewayInstance, wide bool) {
	w := o.Out
	st := gi.Status
	fmt.Fprintf(w, "%s on %s  (%s)\n", gi.Spec.Profile, gi.Spec.Host, gi.Name)
	for _, typ := range []string{v1.ConditionAligned, v1.ConditionIsolated, v1.ConditionDegraded} {
		if cnd := condition(st.Conditions, typ); cnd != nil {
			fmt.Fprintf(w, "  %-9s %s  %s: %s\n", typ+":", cnd.Status, cnd.Reason, oneLine(cnd.Message, 200))
		}
	}
	fmt.Fprintf(w, "  target:    %s (sha256 %s)\n", gi.Spec.Release.Label, gi.Spec.Release.SHA256)
	if st.CurrentRelease != nil {
		fmt.Fprintf(w, "  current:   %s (sha256 %s)\n", st.CurrentRelease.Label, st.CurrentRelease.SHA256)
	}
	if st.LastGoodRelease != nil {
		fmt.Fprintf(w, "  last good: %s\n", st.LastGoodRelease.Label)
	}
	if st.Unit != "" || st.MainPID != 0 {
		fmt.Fprintf(w, "  unit:      %s, main PID %d\n", st.Unit, st.MainPID)
	}
	if a := st.Alignment; a != nil {
		fmt.Fprintln(w, "  alignment, read from the running process:")
		fmt.Fprintf(w, "    release sha256:     %s\n", a.ReleaseSHA256)
		fmt.Fprintf(w, "    PYTHONPATH:         %s\n", a.PythonPath)
		fmt.Fprintf(w, "    runtime path:       %s\n", a.RuntimePath)
		fmt.Fprintf(w, "    cwd:                %s\n", a.Cwd)
		fmt.Fprintf(w, "    exe:                %s\n", a.Exe)
		fmt.Fprintf(w, "    unit sets no PYTHONPATH: %s\n", mark(a.UnitClean))
		fmt.Fprintf(w, "    siblings unchanged:      %s\n", mark(a.SiblingsUnchanged))
		if a.CheckedAt != nil {
			fmt.Fprintf(w, "    checked:            %s ago\n", o.age(a.CheckedAt))
		}
		if wide {
			fmt.Fprintf(w, "    control group:      %s\n", a.ControlGroup)
			fmt.Fprintf(w, "    process start time: %d\n", a.StartTime)
			fmt.Fprintf(w, "    sys.path:           %s\n", strings.Join(a.SysPath, " "))
			for _, s := range a.SelfReported {
				fmt.Fprintf(w, "    self-reported:      %s\n", s)
			}
		}
	} else {
		fmt.Fprintln(w, "  alignment: not proven yet")
	}
	if is := st.Isolation; is != nil {
		fmt.Fprintf(w, "  isolation: user %s", is.User)
		if is.ExposureScore != "" {
			fmt.Fprintf(w, ", systemd-analyze security exposure %s", is.ExposureScore)
		}
		fmt.Fprintln(w)
		if is.Message != "" {
			fmt.Fprintf(w, "    %s\n", oneLine(is.Message, 200))
		}
		for _, ch := range is.Checks {
			fmt.Fprintf(w, "    %-6s %s", mark(ch.Passed), ch.Name)
			if ch.Message != "" && (wide || !ch.Passed) {
				fmt.Fprintf(w, ": %s", oneLine(ch.Message, 160))
			}
			fmt.Fprintln(w)
		}
	}
	if st.ObservedGeneration != gi.Generation {
		fmt.Fprintf(w, "  note: the agent has not applied the latest spec yet (generation %d, applied %d)\n", gi.Generation, st.ObservedGeneration)
	}
}
