package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
	"unicode/utf8"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
)

// Host route policies (--toolrun-route): which routes this host offers its profiles.
const (
	// RouteAuto offers both: a profile's route, or else a host-local microVM when the host has
	// one and the cluster when it has not.
	RouteAuto = "auto"
	// RouteHost offers host-local microVMs only.
	RouteHost = "host"
	// RouteCluster offers the cluster only.
	RouteCluster = "cluster"
)

// Defaults of the cluster route.
const (
	// DefaultToolRunGrace is what a cluster run may take beyond its own timeout: scheduling,
	// image pull and the controller's round trips.
	DefaultToolRunGrace = 2 * time.Minute
	// DefaultClusterOutputCap bounds what the agent relays of a cluster run's output (a
	// ToolRun's status holds at most 16 KiB anyway).
	DefaultClusterOutputCap = 16 << 10
	// createTimeout bounds placing a run in a slot: the create, and replacing a stale run.
	createTimeout = 30 * time.Second
)

// Limits of a ToolRun's spec (api/v1alpha1/toolrun_types.go): a request beyond them cannot take
// the cluster route and is refused, not cut.
const (
	maxClusterArgs     = 64
	maxClusterArgBytes = 4096
	maxClusterStdin    = 64 << 10
)

// ToolRouter is the one door of a profile's tool-run socket: it runs each request on the route
// the profile's settings and the host's policy allow, and says which in the reply.
type ToolRouter struct {
	// Local runs requests in microVMs on this host; nil when the host has none.
	Local microvm.Executor
	// Cluster runs requests as ToolRuns; nil when the host offers no cluster route.
	Cluster *ClusterRuns
	// Policy is the host's route policy: RouteAuto, RouteHost or RouteCluster.
	Policy string
	// HostPerProfile is how many host-local runs of one profile run at once (default 1); more
	// are refused, so one gateway cannot hold every microVM of the host. Cluster runs are
	// bounded by the profile's slots instead.
	HostPerProfile int

	mu       sync.Mutex
	settings map[string]*v1.ToolRunSettings
	hostBusy map[string]int
}

// SocketsPerProfile is how many requests of one profile the socket takes at once: enough for
// every cluster slot; the router refuses what a route cannot take.
const SocketsPerProfile = v1.MaxToolRunSlots

// NewToolRouter checks the host's policy against what the host has; nil when it offers no
// route at all (then no profile gets a socket).
func NewToolRouter(policy string, local microvm.Executor, cluster *ClusterRuns) (*ToolRouter, error) {
	switch policy {
	case "":
		policy = RouteAuto
	case RouteAuto, RouteCluster:
	case RouteHost:
		if local == nil {
			return nil, errors.New("--toolrun-route=host needs host-local microVMs (--microvm-guest)")
		}
	default:
		return nil, fmt.Errorf("--toolrun-route %q is not one of auto, host, cluster", policy)
	}
	r := &ToolRouter{Policy: policy, Local: local, Cluster: cluster}
	if policy == RouteHost {
		r.Cluster = nil
	}
	if policy == RouteCluster {
		r.Local = nil
	}
	if r.Local == nil && r.Cluster == nil {
		return nil, nil
	}
	return r, nil
}

// SetProfile records a profile's tool-run settings, as its GatewayInstance states them.
func (r *ToolRouter) SetProfile(profile string, s *v1.ToolRunSettings) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.settings == nil {
		r.settings = map[string]*v1.ToolRunSettings{}
	}
	r.settings[profile] = s.DeepCopy()
}

// Forget drops a profile that left the host.
func (r *ToolRouter) Forget(profile string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.settings, profile)
}

func (r *ToolRouter) profile(p string) (*v1.ToolRunSettings, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.settings[p]
	return s, ok
}

// route picks the route of one request of a profile, or says why there is none.
func (r *ToolRouter) route(s *v1.ToolRunSettings) (microvm.Route, string) {
	want := v1.ToolRunRouteAuto
	if s != nil && s.Route != "" {
		want = s.Route
	}
	switch want {
	case v1.ToolRunRouteHost:
		if r.Local == nil {
			return "", "the profile's tool runs take route Host, and this host runs no microVMs (--toolrun-route=" + r.Policy + ")"
		}
		return microvm.RouteHost, ""
	case v1.ToolRunRouteCluster:
		if r.Cluster == nil {
			return "", "the profile's tool runs take route Cluster, and this host does not offer it (--toolrun-route=" + r.Policy + ")"
		}
		return microvm.RouteCluster, ""
	}
	if r.Local != nil {
		return microvm.RouteHost, ""
	}
	return microvm.RouteCluster, ""
}

// Execute runs req for profile on its route.
func (r *ToolRouter) Execute(ctx context.Context, profile string, req microvm.Request) (microvm.Result, error) {
	s, known := r.profile(profile)
	if !known {
		return microvm.Result{Phase: microvm.Rejected, ExitCode: -1, Message: "profile " + profile + " does not run on this host"}, nil
	}
	route, why := r.route(s)
	if route == "" {
		return microvm.Result{Phase: microvm.Rejected, ExitCode: -1, Message: why}, nil
	}
	if route == microvm.RouteHost {
		if !r.takeHost(profile) {
			return microvm.Result{Phase: microvm.Rejected, ExitCode: -1, Route: microvm.RouteHost,
				Message: fmt.Sprintf("profile %s already has %d host-local tool runs in progress", profile, r.hostLimit())}, nil
		}
		defer r.releaseHost(profile)
		res, err := r.Local.Execute(ctx, profile, req)
		res.Route = microvm.RouteHost
		return res, err
	}
	res, err := r.Cluster.Run(ctx, profile, s, req)
	res.Route = microvm.RouteCluster
	return res, err
}

func (r *ToolRouter) hostLimit() int { return max(r.HostPerProfile, 1) }

func (r *ToolRouter) takeHost(profile string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hostBusy == nil {
		r.hostBusy = map[string]int{}
	}
	if r.hostBusy[profile] >= r.hostLimit() {
		return false
	}
	r.hostBusy[profile]++
	return true
}

func (r *ToolRouter) releaseHost(profile string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.hostBusy[profile]--; r.hostBusy[profile] <= 0 {
		delete(r.hostBusy, profile)
	}
}

// ClusterRuns runs requests as ToolRuns the agent creates on a profile's behalf, under the
// slot names <profile>.<host>.<k> the controller manager grants the host, and relays their
// results. A gateway never sees a Kubernetes credential: only the agent talks to the API.
type ClusterRuns struct {
	// Client creates and deletes ToolRuns; Reader reads them straight from the API server
	// (the agent may get its slots by name, not list or watch every run).
	Client client.Writer
	Reader client.Reader
	// Namespace holds the runs (--toolrun-namespace); Host is this host's name.
	Namespace, Host string
	// Grace is how long a run may take beyond its timeout (DefaultToolRunGrace).
	Grace time.Duration
	// OutputCap bounds the relayed output (DefaultClusterOutputCap).
	OutputCap int
	// PollInterval is the longest wait between two reads of a running run (1s when 0).
	PollInterval time.Duration

	mu   sync.Mutex
	held map[string]bool
}

func rejected(format string, a ...any) microvm.Result {
	return microvm.Result{Phase: microvm.Rejected, ExitCode: -1, Message: fmt.Sprintf(format, a...)}
}

// clusterSpec is the ToolRun spec that runs req for profile, or why req cannot take the
// cluster route.
func clusterSpec(profile string, s *v1.ToolRunSettings, req microvm.Request) (v1.ToolRunSpec, error) {
	if err := req.Validate(); err != nil {
		return v1.ToolRunSpec{}, err
	}
	if len(req.Command) > maxClusterArgs {
		return v1.ToolRunSpec{}, fmt.Errorf("a cluster run takes at most %d arguments, not %d", maxClusterArgs, len(req.Command))
	}
	for i, a := range req.Command {
		if len(a) > maxClusterArgBytes {
			return v1.ToolRunSpec{}, fmt.Errorf("argument %d is %d bytes; a cluster run takes at most %d", i, len(a), maxClusterArgBytes)
		}
	}
	if len(req.Stdin) > maxClusterStdin || !utf8.Valid(req.Stdin) {
		return v1.ToolRunSpec{}, fmt.Errorf("a cluster run takes stdin of at most %d bytes of UTF-8 text", maxClusterStdin)
	}
	// The run carries the profile's image and resources, which the ToolRun controller checks
	// against the instance, and a timeout of at most microvm.MaxTimeout, the most the agent
	// policy admits (600 s).
	return v1.ToolRunSpec{
		Profile: profile, Image: s.Image, Command: req.Command, Stdin: string(req.Stdin),
		Resources: s.ClusterResources(), TimeoutSeconds: int32(req.Timeout() / time.Second), //nolint:gosec // at most MaxTimeout (Validate)
	}, nil
}

// Run creates the run in a free slot, waits for its end within its timeout plus the grace,
// relays its result and deletes it.
func (c *ClusterRuns) Run(ctx context.Context, profile string, s *v1.ToolRunSettings, req microvm.Request) (microvm.Result, error) {
	start := time.Now()
	slots := s.Slots()
	if slots == 0 {
		return rejected("profile %s names no image for cluster tool runs (spec.toolRuns.image)", profile), nil
	}
	spec, err := clusterSpec(profile, s, req)
	if err != nil {
		return rejected("invalid request: %v", err), nil
	}
	// Every API call has a deadline: a stalled API server must not hold the request, its slot
	// and its share of the socket for ever. The wait below has its own.
	cctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	tr, res, err := c.create(cctx, profile, slots, spec)
	if tr == nil {
		res.DurationMillis = time.Since(start).Milliseconds()
		return res, err
	}
	defer c.finish(tr)
	res, err = c.wait(ctx, tr, req.Timeout()+c.grace())
	res.DurationMillis = time.Since(start).Milliseconds()
	return res, err
}

func (c *ClusterRuns) grace() time.Duration {
	if c.Grace > 0 {
		return c.Grace
	}
	return DefaultToolRunGrace
}

// claim reserves slot name in this agent; false when another request of the agent holds it.
func (c *ClusterRuns) claim(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held == nil {
		c.held = map[string]bool{}
	}
	if c.held[name] {
		return false
	}
	c.held[name] = true
	return true
}

func (c *ClusterRuns) release(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.held, name)
}

// create makes the run in the first slot this agent does not hold. A run already stored in
// such a slot is left over from an earlier agent process: it is deleted and the slot reused.
func (c *ClusterRuns) create(ctx context.Context, profile string, slots int, spec v1.ToolRunSpec) (*v1.ToolRun, microvm.Result, error) {
	for k := range slots {
		name := v1.ToolRunSlot(profile, c.Host, k)
		if name == "" {
			return nil, rejected("ToolRun names %s.%s.<k> would exceed 63 characters: profile and host names are too long for the cluster route", profile, c.Host), nil
		}
		if !c.claim(name) {
			continue
		}
		tr := &v1.ToolRun{ObjectMeta: metav1.ObjectMeta{Namespace: c.Namespace, Name: name,
			Labels: map[string]string{v1.LabelProfile: profile, v1.LabelHost: c.Host}}, Spec: spec}
		err := c.Client.Create(ctx, tr)
		if apierrors.IsAlreadyExists(err) {
			derr := c.remove(ctx, name)
			if derr == nil {
				tr.ResourceVersion = ""
				err = c.Client.Create(ctx, tr)
			} else if apierrors.IsForbidden(derr) {
				// Not an agent's run of this host (made by hand): left alone.
				c.release(name)
				return nil, rejected("ToolRun slot %s/%s holds a run this host's agent did not create: %v", c.Namespace, name, derr), nil
			}
		}
		if err == nil {
			return tr, microvm.Result{}, nil
		}
		c.release(name)
		if apierrors.IsForbidden(err) {
			return nil, rejected("the cluster refused the run: %v", err), nil
		}
		return nil, microvm.Result{Phase: microvm.Error, ExitCode: -1, Message: "create ToolRun: " + err.Error()}, err
	}
	return nil, rejected("profile %s holds all its %d cluster tool-run slots on this host", profile, slots), nil
}

// remove deletes the run stored in a slot, exactly that one (UID precondition).
func (c *ClusterRuns) remove(ctx context.Context, name string) error {
	var old v1.ToolRun
	if err := c.Reader.Get(ctx, client.ObjectKey{Namespace: c.Namespace, Name: name}, &old); err != nil {
		return client.IgnoreNotFound(err)
	}
	uid := old.UID
	if err := c.Client.Delete(ctx, &old, client.Preconditions{UID: &uid}); client.IgnoreNotFound(err) != nil {
		return err
	}
	// The slot is free once the object is gone (finalizers or a slow store).
	for range 50 {
		err := c.Reader.Get(ctx, client.ObjectKey{Namespace: c.Namespace, Name: name}, &old)
		if apierrors.IsNotFound(err) || (err == nil && old.UID != uid) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("ToolRun %s/%s is still there after its deletion", c.Namespace, name)
}

// finish deletes the run (whatever became of the request's context) and frees its slot.
func (c *ClusterRuns) finish(tr *v1.ToolRun) {
	defer c.release(tr.Name)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	uid := tr.UID
	_ = c.Client.Delete(ctx, tr, client.Preconditions{UID: &uid})
}

// wait reads the run until it ends or the deadline passes.
func (c *ClusterRuns) wait(ctx context.Context, tr *v1.ToolRun, limit time.Duration) (microvm.Result, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	maxPoll := c.PollInterval
	if maxPoll <= 0 {
		maxPoll = time.Second
	}
	delay := min(50*time.Millisecond, maxPoll)
	for {
		var cur v1.ToolRun
		err := c.Reader.Get(ctx, client.ObjectKeyFromObject(tr), &cur)
		switch {
		case err == nil && cur.UID != tr.UID:
			return microvm.Result{Phase: microvm.Error, ExitCode: -1, Message: "the run's ToolRun was replaced"}, nil
		case err == nil && done(cur.Status.Phase):
			return c.result(&cur), nil
		case apierrors.IsNotFound(err):
			return microvm.Result{Phase: microvm.Error, ExitCode: -1, Message: "the run's ToolRun was deleted before it ended"}, nil
		case apierrors.IsForbidden(err):
			// The slot was revoked: the host left the profile's selection, or the profile its
			// cluster runs.
			return microvm.Result{Phase: microvm.Error, ExitCode: -1, Message: "the host may no longer read its run: " + err.Error()}, nil
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return microvm.Result{Phase: microvm.TimedOut, ExitCode: -1,
					Message: fmt.Sprintf("no result from ToolRun %s/%s within %s", tr.Namespace, tr.Name, limit)}, nil
			}
			return microvm.Result{Phase: microvm.Error, ExitCode: -1, Message: "the request was canceled"}, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, maxPoll)
	}
}

func done(p v1.ToolRunPhase) bool {
	switch p {
	case v1.ToolRunSucceeded, v1.ToolRunFailed, v1.ToolRunTimedOut, v1.ToolRunRejected:
		return true
	}
	return false
}

// result is what the gateway gets of a finished run: its output (capped) as stdout.
func (c *ClusterRuns) result(tr *v1.ToolRun) microvm.Result {
	capBytes := c.OutputCap
	if capBytes <= 0 {
		capBytes = DefaultClusterOutputCap
	}
	res := microvm.Result{Phase: microvm.Phase(tr.Status.Phase), ExitCode: -1,
		Stdout: []byte(tr.Status.Output), StdoutTruncated: tr.Status.OutputTruncated}
	if len(res.Stdout) > capBytes {
		res.Stdout, res.StdoutTruncated = res.Stdout[:capBytes], true
	}
	if len(res.Stdout) == 0 {
		res.Stdout = nil
	}
	if tr.Status.ExitCode != nil {
		res.ExitCode = int(*tr.Status.ExitCode)
	}
	if tr.Status.Phase != v1.ToolRunSucceeded && tr.Status.Phase != v1.ToolRunFailed {
		if f := meta.FindStatusCondition(tr.Status.Conditions, v1.ConditionFailed); f != nil {
			res.Message = f.Message
		}
	}
	return res
}
