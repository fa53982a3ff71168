package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func newHistoryCommand(o *options) *cobra.Command {
	var out output
	cmd := &cobra.Command{
		Use:   "history PROFILE",
		Short: "List a profile's last rollouts: from, to, start, end and result",
		Example: `  kubectl gateway history core
  kubectl gateway rollback core   # back to where the last rollout started from`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			f, err := o.load(args[0], false)
			if err != nil {
				return err
			}
			gp := &f.profiles[0]
			if out.structured() {
				return out.print(o.Out, o.scheme, gp)
			}
			st := gp.Status
			t := newTable(o.Out, colors(o.Out), 4)
			t.header("STARTED", "ENDED", "FROM", "TO", "RESULT")
			if r := st.Rollout; r != nil {
				res := phaseCell(r.Phase)
				if r.Phase != v1.RolloutComplete && r.Phase != v1.RolloutAborted && r.Step != "" {
					res.text += " (" + r.Step + ")"
				}
				t.row(p(o.ago(r.StartTime)), p(""), p(summaryText(r.From)), p(summaryText(r.To)), res)
			}
			// The history is newest first, as the table is.
			for _, r := range st.History {
				res := c(r.Result, busy)
				switch r.Result {
				case string(v1.RolloutComplete):
					res = c(r.Result, good)
				case string(v1.RolloutHalted), string(v1.RolloutAborted):
					res = c(r.Result, bad)
				}
				t.row(p(o.ago(r.StartTime)), p(o.ago(r.EndTime)), p(summaryText(r.From)), p(summaryText(r.To)), res)
			}
			if err := t.flush(); err != nil {
				return err
			}
			if st.Rollout == nil {
				fmt.Fprintln(o.Out, "(no rollouts recorded)")
			}
			return nil
		},
	}
	out.add(cmd)
	return cmd
}

// summaryText names a release as the user wrote it (the Release's name) with its label.
func summaryText(r *v1.ReleaseSummary) string {
	switch {
	case r == nil:
		return ""
	case r.Label == "" || r.Label == r.Name:
		return r.Name
	}
	return r.Name + " (" + r.Label + ")"
}
