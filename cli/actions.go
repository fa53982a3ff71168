package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// waitFlags are the --wait and --timeout of the actions.
type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func (w *waitFlags) add(cmd *cobra.Command, until string) {
	cmd.Flags().BoolVar(&w.wait, "wait", false, "wait until "+until)
	cmd.Flags().DurationVar(&w.timeout, "timeout", 5*time.Minute, "how long --wait waits")
}

// newToken returns a request token never used before on this profile: the time in
// nanoseconds, as docs/rollouts.md suggests for hand-written requests.
func newToken() string { return strconv.FormatInt(time.Now().UnixNano(), 10) }

// request is one of the token requests of a GatewayProfile (docs/rollouts.md).
type request struct {
	verb, annotation string
	handled          func(*v1.HandledRequests) string
	short, long      string
}

var requests = []request{
	{"promote", v1.AnnotationPromote, func(h *v1.HandledRequests) string { return h.Promote },
		"End a canary pause: move the rest of the hosts", "End the canary pause of a profile's rollout, so the remaining hosts move."},
	{"resume", v1.AnnotationResume, func(h *v1.HandledRequests) string { return h.Resume },
		"Resume a halted rollout: apply the failed hosts again", "Resume a halted rollout: each failed host's agent applies the target again, then the rollout goes on."},
	{"abort", v1.AnnotationAbort, func(h *v1.HandledRequests) string { return h.Abort },
		"Abort a rollout: every moved host returns to where the rollout started", "Abort a profile's rollout: every moved host returns to the release the rollout started from."},
}

func newRequestCommand(o *options, r request) *cobra.Command {
	var w waitFlags
	cmd := &cobra.Command{
		Use:   r.verb + " PROFILE",
		Short: r.short,
		Long: r.long + `

The request is the annotation ` + r.annotation + ` with a new token; the controller acts once
per token and records it in status.lastHandled.` + r.verb + `.`,
		Example: "  kubectl gateway " + r.verb + " core --wait",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return o.request(args[0], r, w)
		},
	}
	w.add(cmd, "the controller has handled the request")
	return cmd
}

func (o *options) request(profile string, r request, w waitFlags) error {
	cl, ctx, cancel, err := o.forProfile(profile)
	if err != nil {
		return err
	}
	defer cancel()
	token := newToken()
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{r.annotation: token}}})
	if err != nil {
		return err
	}
	gp := &v1.GatewayProfile{}
	gp.Name = profile
	if err := cl.Patch(ctx, gp, client.RawPatch(types.MergePatchType, patch)); err != nil {
		return explain(err, r.verb+" "+profile)
	}
	fmt.Fprintf(o.Out, "gatewayprofile/%s: %s requested (token %s)\n", profile, r.verb, token)
	if !w.wait {
		return nil
	}
	want := v1.RequestToken(token)
	err = o.poll(ctx, cl, profile, w.timeout, func(gp *v1.GatewayProfile) bool {
		return gp.Status.LastHandled != nil && r.handled(gp.Status.LastHandled) == want
	})
	if err != nil {
		return fmt.Errorf("%s %s: the controller has not handled the request: %w", r.verb, profile, err)
	}
	fmt.Fprintf(o.Out, "gatewayprofile/%s: %s handled\n", profile, r.verb)
	return nil
}

// poll reads the profile until done says so or the timeout passes.
func (o *options) poll(ctx context.Context, cl client.Client, profile string, timeout time.Duration, done func(*v1.GatewayProfile) bool) error {
	var last error
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		var gp v1.GatewayProfile
		if err := cl.Get(ctx, client.ObjectKey{Name: profile}, &gp); err != nil {
			last = err
			return false, nil //nolint:nilerr // a failed read is retried until the timeout
		}
		return done(&gp), nil
	})
	if err != nil && last != nil {
		return fmt.Errorf("%w (last read: %v)", err, last)
	}
	return err
}

func newPauseCommand(o *options, pause bool) *cobra.Command {
	var w waitFlags
	verb, short := "pause", "Pause a profile's rollouts: no more hosts move (spec.rollout.paused=true)"
	if !pause {
		verb, short = "unpause", "Let a paused profile's rollout go on (spec.rollout.paused=false)"
	}
	cmd := &cobra.Command{
		Use:   verb + " PROFILE",
		Short: short,
		Long: short + ".\n\nHosts already moving finish; a pause does not roll anything back. It holds the\n" +
			"current rollout, or the next one, until unpause. --wait waits until the controller saw it.",
		Example: "  kubectl gateway " + verb + " core --wait",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			patch := fmt.Sprintf(`{"spec":{"rollout":{"paused":%t}}}`, pause)
			// A pause holds the next moves of a rollout; a complete profile stays Complete.
			return o.patchSpec(args[0], verb, patch, w, func(*v1.GatewayProfile) bool { return true })
		},
	}
	w.add(cmd, "the controller has seen the change")
	return cmd
}

// patchSpec merge-patches a profile's spec and, with --wait, waits until the controller has
// observed the new generation and done agrees.
func (o *options) patchSpec(profile, verb, patch string, w waitFlags, done func(*v1.GatewayProfile) bool) error {
	cl, ctx, cancel, err := o.forProfile(profile)
	if err != nil {
		return err
	}
	defer cancel()
	gp := &v1.GatewayProfile{}
	gp.Name = profile
	if err := cl.Patch(ctx, gp, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		return explain(err, verb+" "+profile)
	}
	fmt.Fprintf(o.Out, "gatewayprofile/%s: %s (generation %d)\n", profile, verb, gp.Generation)
	if !w.wait {
		return nil
	}
	gen := gp.Generation
	err = o.poll(ctx, cl, profile, w.timeout, func(gp *v1.GatewayProfile) bool {
		return gp.Status.ObservedGeneration >= gen && done(gp)
	})
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, profile, err)
	}
	fmt.Fprintf(o.Out, "gatewayprofile/%s: done\n", profile)
	return nil
}

func newRollbackCommand(o *options) *cobra.Command {
	var w waitFlags
	var to string
	cmd := &cobra.Command{
		Use:   "rollback PROFILE [--to RELEASE]",
		Short: "Set a profile back to the release its last rollout started from (or --to another)",
		Long: `Set spec.release back to the Release the last rollout started from (status.rollout.from,
else the newest entry of status.history), or to the Release --to names. This starts a new
rollout; hosts keep their last releases on disk, so it is fast. With --wait, wait until that
rollout is complete, or stops at a canary pause (then promote it) or halts.`,
		Example: `  kubectl gateway rollback core --wait
  kubectl gateway rollback core --to agent-runtime-1.4.1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error { return o.rollback(args[0], to, w) },
	}
	cmd.Flags().StringVar(&to, "to", "", "the Release to go back to (default: where the last rollout started)")
	w.add(cmd, "the rollout back is complete, paused at its canary step, or halted")
	return cmd
}

// rollbackTarget is the Release the last rollout started from.
func rollbackTarget(gp *v1.GatewayProfile) string {
	if r := gp.Status.Rollout; r != nil && r.From != nil && r.From.Name != "" {
		return r.From.Name
	}
	// The history is newest first.
	for _, h := range gp.Status.History {
		if h.From != nil && h.From.Name != "" {
			return h.From.Name
		}
	}
	return ""
}

func (o *options) rollback(profile, to string, w waitFlags) error {
	cl, ctx, cancel, err := o.forProfile(profile)
	if err != nil {
		return err
	}
	defer cancel()
	var gp v1.GatewayProfile
	if err := cl.Get(ctx, client.ObjectKey{Name: profile}, &gp); err != nil {
		return explain(err, "get gatewayprofile "+profile)
	}
	if to == "" {
		if to = rollbackTarget(&gp); to == "" {
			return fmt.Errorf("rollback %s: no rollout recorded a release to go back to; name one with --to", profile)
		}
	}
	if to == gp.Spec.Release {
		return fmt.Errorf("rollback %s: the profile already targets %s", profile, to)
	}
	var rel v1.Release
	if err := cl.Get(ctx, client.ObjectKey{Name: to}, &rel); err != nil {
		return explain(err, "get release "+to)
	}
	patch, err := json.Marshal(map[string]any{"spec": map[string]any{"release": to}})
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Out, "gatewayprofile/%s: rolling back from %s to %s\n", profile, gp.Spec.Release, to)
	var last *v1.GatewayProfile
	err = o.patchSpec(profile, "rollback to "+to, string(patch), w, func(gp *v1.GatewayProfile) bool {
		last = gp
		r := gp.Status.Rollout
		return r != nil && r.To != nil && r.To.Name == to && r.Phase != v1.RolloutProgressing
	})
	if err != nil || !w.wait {
		return err
	}
	// A rollback is a rollout: it can stop at a canary pause or halt like any other.
	switch last.Status.Rollout.Phase {
	case v1.RolloutPaused:
		fmt.Fprintf(o.Out, "gatewayprofile/%s: the rollback waits at its canary pause: kubectl gateway promote %s --wait\n", profile, profile)
	case v1.RolloutHalted, v1.RolloutAborted:
		return fmt.Errorf("rollback %s: the rollout to %s is %s: see kubectl gateway status %s", profile, to, last.Status.Rollout.Phase, profile)
	}
	return nil
}
