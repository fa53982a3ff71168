package cli

import (
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func newHostsCommand(o *options) *cobra.Command {
	var out output
	cmd := &cobra.Command{
		Use:   "hosts",
		Short: "List hosts: heartbeat age, agent and systemd versions, capabilities, cordon state",
		Example: `  kubectl gateway hosts
  kubectl gateway hosts -o wide`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			f, err := o.load("", true)
			if err != nil {
				return err
			}
			if out.structured() {
				objs := make([]runtime.Object, len(f.hosts))
				for i := range f.hosts {
					objs[i] = &f.hosts[i]
				}
				return out.print(o.Out, o.scheme, objs...)
			}
			return o.printHosts(f, out.wide())
		},
	}
	out.add(cmd)
	return cmd
}

func (o *options) printHosts(f *fleet, wide bool) error {
	if len(f.hosts) == 0 {
		fmt.Fprintln(o.Out, "No gateway hosts.")
		return nil
	}
	count := map[string]int{}
	for _, l := range f.instances {
		for _, gi := range l {
			count[gi.Spec.Host]++
		}
	}
	cols := []string{"HOST", "REACHABLE", "HEARTBEAT", "AGENT", "SYSTEMD", "CAPABILITIES", "CORDONED", "PROFILES"}
	if wide {
		cols = append(cols, "AGENT-ID", "LABELS")
	}
	t := newTable(o.Out, colors(o.Out), 1, 6)
	t.header(cols...)
	for _, h := range f.hosts {
		reach, rk := isTrue(h.Status.Conditions, v1.ConditionReachable)
		var caps []string
		if h.Status.Capabilities.KVM {
			caps = append(caps, "kvm")
		}
		if h.Status.Capabilities.Kata {
			caps = append(caps, "kata")
		}
		if h.Status.Capabilities.MicroVM {
			caps = append(caps, "microvm")
		}
		cordoned := p("no")
		if h.Spec.Unschedulable {
			cordoned = c("yes", busy)
		}
		age := o.age(h.Status.LastHeartbeatTime)
		if age != "" {
			age += " ago"
		}
		row := []cell{p(h.Name), yesNo(reach, rk), p(age), p(h.Status.AgentVersion), p(h.Status.SystemdVersion),
			p(strings.Join(caps, ",")), cordoned, p(fmt.Sprint(count[h.Name]))}
		if wide {
			var labels []string
			for k, v := range h.Labels {
				labels = append(labels, k+"="+v)
			}
			sort.Strings(labels)
			row = append(row, p(h.Status.AgentID), p(strings.Join(labels, ",")))
		}
		t.row(row...)
	}
	return t.flush()
}

func newCordonCommand(o *options, cordon bool) *cobra.Command {
	use, short, example := "cordon HOST", "Stop moving a host in rollouts (spec.unschedulable=true)", "  kubectl gateway cordon edge-1"
	if !cordon {
		use, short, example = "uncordon HOST", "Let rollouts move a host again (spec.unschedulable=false)", "  kubectl gateway uncordon edge-1"
	}
	return &cobra.Command{
		Use:     use,
		Short:   short,
		Long:    short + ".\n\nA cordoned host keeps running what it runs; rollouts neither move it nor count it against maxUnavailable.",
		Example: example,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := v1.ValidateHostName(args[0]); err != nil {
				return err
			}
			cl, err := o.client()
			if err != nil {
				return err
			}
			ctx, cancel := o.ctx()
			defer cancel()
			patch := fmt.Sprintf(`{"spec":{"unschedulable":%t}}`, cordon)
			gh := &v1.GatewayHost{}
			gh.Name = args[0]
			verb := strings.Fields(use)[0]
			if err := cl.Patch(ctx, gh, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
				return explain(err, verb+" "+args[0])
			}
			fmt.Fprintf(o.Out, "gatewayhost/%s %sed\n", args[0], verb)
			return nil
		},
	}
}
