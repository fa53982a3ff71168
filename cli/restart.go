package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func newRestartCommand(o *options) *cobra.Command {
	var w waitFlags
	var host string
	cmd := &cobra.Command{
		Use:   "restart PROFILE --host HOST",
		Short: "Restart exactly one profile's unit on one host, and have its agent prove it again",
		Long: `Restart agent-gateway@PROFILE.service on one host, nothing else: a plugin or config change
the gateway reads at start is picked up only by a restart. The host's agent restarts the unit,
proves the new process aligned and the sibling profiles' processes unchanged, and records the
request in the instance's status.lastHandledRestart.

The request is the annotation ` + v1.AnnotationRestart + ` on GatewayInstance PROFILE.HOST.`,
		Example: "  kubectl gateway restart core --host edge-1 --wait",
		Args:    cobra.ExactArgs(1),
		RunE:    func(cmd *cobra.Command, args []string) error { return o.restart(args[0], host, w) },
	}
	cmd.Flags().StringVar(&host, "host", "", "the host (required)")
	_ = cmd.MarkFlagRequired("host")
	w.add(cmd, "the agent has restarted the unit and proven it")
	return cmd
}

func (o *options) restart(profile, host string, w waitFlags) error {
	if err := v1.ValidateHostName(host); err != nil {
		return err
	}
	cl, ctx, cancel, err := o.forProfile(profile)
	if err != nil {
		return err
	}
	defer cancel()
	name := v1.InstanceName(profile, host)
	var gi v1.GatewayInstance
	if err := cl.Get(ctx, client.ObjectKey{Name: name}, &gi); err != nil {
		return explain(err, "get gatewayinstance "+name)
	}
	before := gi.Status.MainPID
	token := newToken()
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{v1.AnnotationRestart: token}}})
	if err != nil {
		return err
	}
	if err := cl.Patch(ctx, &gi, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return explain(err, "restart "+name)
	}
	fmt.Fprintf(o.Out, "gatewayinstance/%s: restart requested (token %s)\n", name, token)
	if !w.wait {
		return nil
	}
	want := v1.RequestToken(token)
	err = wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, w.timeout, true, func(ctx context.Context) (bool, error) {
		if err := cl.Get(ctx, client.ObjectKey{Name: name}, &gi); err != nil {
			return false, nil //nolint:nilerr // a failed read is retried until the timeout
		}
		return gi.Status.LastHandledRestart == want, nil
	})
	if err != nil {
		return fmt.Errorf("restart %s: the agent of %s has not handled the request: %w", name, host, err)
	}
	aligned := condition(gi.Status.Conditions, v1.ConditionAligned)
	if aligned == nil || aligned.Status != "True" {
		msg := "no proof"
		if aligned != nil {
			msg = aligned.Reason + ": " + aligned.Message
		}
		if d := condition(gi.Status.Conditions, v1.ConditionDegraded); d != nil && d.Status == "True" {
			msg = d.Reason + ": " + d.Message
		}
		return fmt.Errorf("restart %s: restarted, but not proven aligned: %s", name, msg)
	}
	siblings := "siblings unchanged"
	if a := gi.Status.Alignment; a == nil || !a.SiblingsUnchanged {
		siblings = "siblings NOT proven unchanged"
	}
	fmt.Fprintf(o.Out, "gatewayinstance/%s: restarted and proven aligned: main PID %d -> %d, %s\n", name, before, gi.Status.MainPID, siblings)
	return nil
}
