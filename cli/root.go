// Package cli is the `kubectl gateway` plugin: it reads and drives the gateway-operator API the
// way an operator does by hand (annotations, merge patches, status reads), and packs and checks
// release tarballs with the node agent's own code. Every verb is a thin layer over the API or
// over a pure package of nodeagent/; nothing here reaches a host.
package cli

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// options is shared by every verb.
type options struct {
	genericiooptions.IOStreams
	config *genericclioptions.ConfigFlags
	scheme *runtime.Scheme
	// now is the clock, for ages; tests of the tables could set it.
	now func() time.Time
}

// NewCommand returns the root command of kubectl-gateway.
func NewCommand(streams genericiooptions.IOStreams) *cobra.Command {
	o := &options{IOStreams: streams, config: genericclioptions.NewConfigFlags(true), now: time.Now}
	o.scheme = runtime.NewScheme()
	// Both calls only register types; they fail on a programming error alone.
	if err := clientgoscheme.AddToScheme(o.scheme); err != nil {
		panic(err)
	}
	if err := v1.AddToScheme(o.scheme); err != nil {
		panic(err)
	}
	root := &cobra.Command{
		Use:   "kubectl-gateway",
		Short: "Operate agent gateways: status, proofs, rollouts, hosts and release tarballs",
		Long: `kubectl gateway reads and drives the gateway-operator API (gateway.agent.dev).

It changes nothing that kubectl could not: actions are the request annotations and merge
patches documented in docs/rollouts.md. The usual kubectl flags (--kubeconfig, --context,
--as ...) apply.`,
		Annotations:   map[string]string{cobra.CommandDisplayNameAnnotation: "kubectl gateway"},
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.ErrOut)
	// Namespaces mean nothing to these cluster-scoped kinds, so the flag is hidden, not removed:
	// a kubeconfig context may still carry one.
	o.config.AddFlags(root.PersistentFlags())
	_ = root.PersistentFlags().MarkHidden("namespace")
	root.AddCommand(
		newStatusCommand(o), newProofCommand(o), newHistoryCommand(o), newHostsCommand(o),
		newCordonCommand(o, true), newCordonCommand(o, false),
		newReleaseCommand(o),
		newPauseCommand(o, true), newPauseCommand(o, false), newRollbackCommand(o), newRenderCommand(o), newRestartCommand(o),
	)
	for _, r := range requests {
		root.AddCommand(newRequestCommand(o, r))
	}
	return root
}

// Main runs the plugin with the process's streams and arguments and returns its exit code.
func Main() int {
	cmd := NewCommand(genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr})
	if err := cmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		return 1
	}
	return 0
}

// client returns a client for the cluster the kubectl flags name.
func (o *options) client() (client.Client, error) {
	cfg, err := o.config.ToRESTConfig()
	if err != nil {
		return nil, err
	}
	return client.New(cfg, client.Options{Scheme: o.scheme})
}

// ctx bounds one command; an API call should never take this long.
func (o *options) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Minute)
}

// forProfile checks a profile name given on the command line, then returns a client and the
// command's deadline: what every verb that acts on one profile starts with.
func (o *options) forProfile(profile string) (client.Client, context.Context, context.CancelFunc, error) {
	if err := v1.ValidateProfileName(profile); err != nil {
		return nil, nil, nil, err
	}
	cl, err := o.client()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := o.ctx()
	return cl, ctx, cancel, nil
}

// explain turns an API error into a sentence an operator can act on. what is the action
// ("patch gatewayprofile core").
func explain(err error, what string) error {
	switch {
	case err == nil:
		return nil
	case apierrors.IsForbidden(err):
		return fmt.Errorf("%s: permission denied: %w\nReading needs the gateway-operator-viewer role; promote, resume, abort, pause, rollback, restart and cordon need gateway-operator-operator (config/rbac/user_roles.yaml)", what, err)
	case apierrors.IsNotFound(err):
		return fmt.Errorf("%s: %w", what, err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: timed out", what)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// colors reports whether w is a terminal that should get colors: never into a pipe or a file,
// and never with NO_COLOR set (https://no-color.org).
func colors(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || os.Getenv("NO_COLOR") != "" || os.Getenv("TERM") == "dumb" {
		return false
	}
	return term.IsTerminal(int(f.Fd())) //nolint:gosec // a file descriptor fits an int
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
