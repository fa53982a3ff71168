package cli

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/duration"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// fleet is what the reading verbs fetch: profiles, the instances of them, and every host.
type fleet struct {
	profiles  []v1.GatewayProfile
	instances map[string][]v1.GatewayInstance // by profile, sorted by host
	hosts     []v1.GatewayHost
}

// load reads the fleet, or one profile of it. Only get and list are used, so the viewer role
// is enough.
func (o *options) load(profile string, withHosts bool) (*fleet, error) {
	cl, err := o.client()
	if err != nil {
		return nil, err
	}
	ctx, cancel := o.ctx()
	defer cancel()
	f := &fleet{instances: map[string][]v1.GatewayInstance{}}
	if profile != "" {
		var gp v1.GatewayProfile
		if err := cl.Get(ctx, client.ObjectKey{Name: profile}, &gp); err != nil {
			return nil, explain(err, "get gatewayprofile "+profile)
		}
		f.profiles = []v1.GatewayProfile{gp}
	} else {
		var l v1.GatewayProfileList
		if err := cl.List(ctx, &l); err != nil {
			return nil, explain(err, "list gatewayprofiles")
		}
		f.profiles = l.Items
	}
	var il v1.GatewayInstanceList
	if err := cl.List(ctx, &il); err != nil {
		return nil, explain(err, "list gatewayinstances")
	}
	for _, gi := range il.Items {
		if profile == "" || gi.Spec.Profile == profile {
			f.instances[gi.Spec.Profile] = append(f.instances[gi.Spec.Profile], gi)
		}
	}
	for _, l := range f.instances {
		sort.Slice(l, func(i, j int) bool { return l[i].Spec.Host < l[j].Spec.Host })
	}
	sort.Slice(f.profiles, func(i, j int) bool { return f.profiles[i].Name < f.profiles[j].Name })
	if withHosts {
		var hl v1.GatewayHostList
		if err := cl.List(ctx, &hl); err != nil {
			return nil, explain(err, "list gatewayhosts")
		}
		f.hosts = hl.Items
		sort.Slice(f.hosts, func(i, j int) bool { return f.hosts[i].Name < f.hosts[j].Name })
	}
	return f, nil
}

// objects lists everything the fleet holds, for -o json|yaml.
func (f *fleet) objects() []runtime.Object {
	var objs []runtime.Object
	for i := range f.profiles {
		objs = append(objs, &f.profiles[i])
		for j := range f.instances[f.profiles[i].Name] {
			objs = append(objs, &f.instances[f.profiles[i].Name][j])
		}
	}
	for i := range f.hosts {
		objs = append(objs, &f.hosts[i])
	}
	return objs
}

func newStatusCommand(o *options) *cobra.Command {
	var out output
	cmd := &cobra.Command{
		Use:   "status [PROFILE]",
		Short: "Show the fleet at a glance: each profile on each host, and each host's profiles",
		Long: `Show each profile's rollout and, for each of its hosts, the target and current release,
whether the running gateway is proven aligned and isolated, and its main PID; then each host
with its profiles. Needs only read access (the gateway-operator-viewer role).`,
		Example: `  kubectl gateway status
  kubectl gateway status core -o wide
  kubectl gateway status core -o yaml   # the profile and its instances`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			profile := ""
			if len(args) == 1 {
				profile = args[0]
			}
			f, err := o.load(profile, profile == "")
			if err != nil {
				return err
			}
			if out.structured() {
				return out.print(o.Out, o.scheme, f.objects()...)
			}
			return o.printStatus(f, out.wide())
		},
	}
	out.add(cmd)
	return cmd
}

func condition(conds []metav1.Condition, typ string) *metav1.Condition {
	return meta.FindStatusCondition(conds, typ)
}

// isTrue reads a condition: known is false when it is absent or Unknown.
func isTrue(conds []metav1.Condition, typ string) (ok, known bool) {
	cnd := condition(conds, typ)
	if cnd == nil || cnd.Status == metav1.ConditionUnknown {
		return false, false
	}
	return cnd.Status == metav1.ConditionTrue, true
}

func releaseText(r *v1.ReleaseSummary) string {
	if r == nil {
		return ""
	}
	if r.Label != "" {
		return r.Label
	}
	return r.Name
}

func shortSHA(r *v1.ReleaseSummary) string {
	if r == nil || len(r.SHA256) < 12 {
		return ""
	}
	return r.SHA256[:12]
}

func phaseCell(phase v1.RolloutPhase) cell {
	switch phase {
	case v1.RolloutComplete:
		return c(string(phase), good)
	case v1.RolloutHalted, v1.RolloutAborted:
		return c(string(phase), bad)
	case "":
		return p("")
	}
	return c(string(phase), busy)
}

func (o *options) printStatus(f *fleet, wide bool) error {
	paint := colors(o.Out)
	if len(f.profiles) == 0 {
		fmt.Fprintln(o.Out, "No gateway profiles.")
	}
	for i, gp := range f.profiles {
		if i > 0 {
			fmt.Fprintln(o.Out)
		}
		st := gp.Status
		phase, step := v1.RolloutPhase(""), ""
		if st.Rollout != nil {
			phase, step = st.Rollout.Phase, st.Rollout.Step
		}
		ready, _ := isTrue(st.Conditions, v1.ConditionReady)
		paused, _ := isTrue(st.Conditions, v1.ConditionPaused)
		head := newTable(o.Out, paint, 5)
		head.header("PROFILE", "RELEASE", "TARGET", "ALIGNED", "PHASE", "STEP")
		head.row(p(gp.Name), p(gp.Spec.Release), p(releaseText(st.TargetRelease)),
			p(fmt.Sprintf("%d/%d", st.Aligned, st.Desired)), phaseCell(phase), p(step))
		if err := head.flush(); err != nil {
			return err
		}
		if cnd := condition(st.Conditions, v1.ConditionReady); cnd != nil && !ready && cnd.Message != "" {
			fmt.Fprintf(o.Out, "  %s: %s\n", cnd.Reason, cnd.Message)
		}
		if paused && !gp.Spec.Rollout.Paused {
			fmt.Fprintf(o.Out, "  canary paused: kubectl gateway promote %s\n", gp.Name)
		}
		cols := []string{"  HOST", "TARGET", "CURRENT", "ALIGNED", "ISOLATED", "PID"}
		if wide {
			cols = append(cols, "SHA256", "UNIT", "MESSAGE")
		}
		t := newTable(o.Out, paint, 3, 4)
		t.header(cols...)
		for _, gi := range f.instances[gp.Name] {
			aligned, ak := isTrue(gi.Status.Conditions, v1.ConditionAligned)
			isolated, ik := isTrue(gi.Status.Conditions, v1.ConditionIsolated)
			pid := ""
			if gi.Status.MainPID > 0 {
				pid = strconv.FormatInt(gi.Status.MainPID, 10)
			}
			target := v1.ReleaseSummary{Name: gi.Spec.Release.Name, Label: gi.Spec.Release.Label}
			row := []cell{p("  " + gi.Spec.Host), p(releaseText(&target)), p(releaseText(gi.Status.CurrentRelease)),
				yesNo(aligned, ak), yesNo(isolated, ik), p(pid)}
			if wide {
				msg := ""
				if d := condition(gi.Status.Conditions, v1.ConditionDegraded); d != nil && d.Status == metav1.ConditionTrue {
					msg = d.Reason + ": " + d.Message
				} else if cnd := condition(gi.Status.Conditions, v1.ConditionIsolated); cnd != nil && cnd.Status != metav1.ConditionTrue {
					msg = cnd.Reason
				}
				row = append(row, p(shortSHA(gi.Status.CurrentRelease)), p(gi.Status.Unit), p(oneLine(msg, 80)))
			}
			t.row(row...)
		}
		if len(f.instances[gp.Name]) == 0 {
			fmt.Fprintln(o.Out, "  (no hosts selected)")
		} else if err := t.flush(); err != nil {
			return err
		}
	}
	if f.hosts == nil {
		return nil
	}
	byHost := map[string][]string{}
	for _, l := range f.instances {
		for _, gi := range l {
			byHost[gi.Spec.Host] = append(byHost[gi.Spec.Host], gi.Spec.Profile)
		}
	}
	fmt.Fprintln(o.Out)
	t := newTable(o.Out, paint, 1)
	t.header("HOST", "REACHABLE", "CORDONED", "PROFILES")
	for _, h := range f.hosts {
		reach, rk := isTrue(h.Status.Conditions, v1.ConditionReachable)
		profiles := byHost[h.Name]
		sort.Strings(profiles)
		cordoned := ""
		if h.Spec.Unschedulable {
			cordoned = "yes"
		}
		t.row(p(h.Name), yesNo(reach, rk), p(cordoned), p(strings.Join(profiles, ",")))
	}
	return t.flush()
}

// oneLine keeps a message on one line and at most n bytes.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n-3] + "..."
	}
	return s
}

// age is how long ago t was, as kubectl prints ages.
func (o *options) age(t *metav1.Time) string {
	if t == nil {
		return ""
	}
	return duration.HumanDuration(o.now().Sub(t.Time))
}

func (o *options) ago(t *metav1.Time) string {
	if a := o.age(t); a != "" {
		return a + " ago"
	}
	return ""
}
