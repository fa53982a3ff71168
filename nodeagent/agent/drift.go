package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/drift"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// Drift: the watcher (nodeagent/drift) turns inotify events and systemd's signals into hints
// per profile; each hint queues that profile's instance under its own work-queue key, so a look
// never runs beside an apply of the same profile. The look compares the host with what was last
// proven and, when something differs, reports it at once (the Drifted condition, a Warning
// event, gateway_agent_drift_total), then heals or leaves the host as found by spec.drift.

var driftTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "gateway_agent_drift_total",
	Help: "Changes found on the host to what the agent rendered and proved, by profile and kind (env, dropin, unit, link, launcher, release, process, state, loaded).",
}, []string{"profile", "kind"})

func init() { metrics.Registry.MustRegister(driftTotal) }

// DefaultReproveInterval is how often an applied instance is re-applied and proven in full
// although nothing was seen to change: the backstop behind the watches.
const DefaultReproveInterval = 5 * time.Minute

func (r *InstanceReconciler) reproveInterval() time.Duration {
	if r.ReproveInterval > 0 {
		return r.ReproveInterval
	}
	return DefaultReproveInterval
}

// driftEvents connects the tracker to the controller: a hint for a profile queues its instance.
func (r *InstanceReconciler) driftEvents() chan event.TypedGenericEvent[*v1.GatewayInstance] {
	ch := make(chan event.TypedGenericEvent[*v1.GatewayInstance], 1024)
	r.Drift.Notify = func(profile string) {
		ch <- event.TypedGenericEvent[*v1.GatewayInstance]{Object: &v1.GatewayInstance{
			ObjectMeta: metav1.ObjectMeta{Name: v1.InstanceName(profile, r.Host)}}}
	}
	return ch
}

// expectDrift records what an apply proved, and watches what it depends on.
func (r *InstanceReconciler) expectDrift(ctx context.Context, profile string, out *apply.Outcome) {
	if r.Drift == nil || out == nil || out.Inputs == nil {
		return
	}
	p, err := layout.ForProfile(profile)
	if err != nil {
		return
	}
	us, err := r.Applier.Systemd.UnitState(ctx, p.Unit)
	if err != nil {
		// Without systemd's view there is nothing to compare with; the backstop proves again.
		r.Drift.Forget(profile)
		return
	}
	r.Drift.Expect(profile, drift.NewExpected(r.Applier.Host, p, out.Inputs, out.MainPID, us.DropInPaths))
	if r.Watcher != nil {
		releases := []string{layout.ReleaseDir(out.Current.SHA256, out.Current.Label)}
		if lg := out.LastGood; lg != nil && *lg != out.Current {
			releases = append(releases, layout.ReleaseDir(lg.SHA256, lg.Label))
		}
		r.Watcher.Watch(profile, releases)
		r.trees.running(r.Applier.Host, profile, releases)
	}
}

// forgetDrift stops watching a removed profile.
func (r *InstanceReconciler) forgetDrift(profile string) {
	if r.Drift != nil {
		r.Drift.Forget(profile)
	}
	if r.Watcher != nil {
		r.Watcher.Forget(profile)
	}
	r.trees.forget(profile)
}

// checkDrift looks for drift before an apply. It returns done when it handled the reconcile
// itself; otherwise the full apply runs (with in.Heal set when it is the backstop).
func (r *InstanceReconciler) checkDrift(ctx context.Context, gi *v1.GatewayInstance, in *apply.Instance) (ctrl.Result, bool, error) {
	if r.Drift == nil {
		return ctrl.Result{}, false, nil
	}
	profile := gi.Spec.Profile
	hints := r.Drift.Take(profile)
	exp, known := r.Drift.Expected(profile)
	_, retry := v1.Requested(gi, v1.AnnotationRetry, gi.Status.LastHandledRetry)
	if !known || retry || gi.Status.ObservedGeneration != gi.Generation {
		return ctrl.Result{}, false, nil // a new spec or a first look: the full apply
	}
	findings, at, unit, err := r.findings(ctx, exp, hints)
	if err != nil {
		r.Drift.Keep(profile, hints)
		return ctrl.Result{}, true, err
	}
	if unit.Transitional() && (len(findings) == 0 || drift.OnlyProcess(findings)) {
		// Starting, stopping or about to be restarted by systemd: say so now, and look again
		// when it is done (systemd announces it).
		r.Drift.Keep(profile, hints)
		if len(findings) > 0 {
			policy := gi.Spec.Drift
			if err := r.reportDrift(ctx, gi, *in, policy, findings, at, true); err != nil {
				return ctrl.Result{}, true, err
			}
		}
		return ctrl.Result{RequeueAfter: r.reproveInterval()}, true, nil
	}
	policy := gi.Spec.Drift
	if policy == "" {
		policy = v1.DriftHeal
	}
	if len(findings) > 0 {
		res, err := r.handleDrift(ctx, gi, *in, policy, findings, at)
		return res, true, err
	}
	if c := meta.FindStatusCondition(gi.Status.Conditions, v1.ConditionDrifted); c != nil && c.Status == metav1.ConditionTrue {
		// Put back by hand (or by another profile's heal of a shared file): say so, and prove
		// the gateway again, which also gathers the isolation evidence anew.
		base := gi.DeepCopy()
		v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionFalse, "NoDrift", "the host is as rendered again at "+now())
		r.Drift.Fresh(profile, nil)
		out, err := r.Applier.Reprove(ctx, *in)
		return r.finishDrift(ctx, gi, base, out, err, nil, time.Time{})
	}
	if len(hints) > 0 {
		// Something moved, but only to where it should be (often the agent's own apply).
		return ctrl.Result{RequeueAfter: r.reproveInterval()}, true, nil
	}
	// The backstop: prove again in full; a Report profile's host is not written.
	if policy == v1.DriftReport {
		out, err := r.Applier.Reprove(ctx, *in)
		return r.finishDrift(ctx, gi, gi.DeepCopy(), out, err, nil, time.Time{})
	}
	in.Heal = true
	return ctrl.Result{}, false, nil
}

// findings reads the host and systemd and compares them with exp; at is when the first sign of
// a change was seen (now for the backstop).
func (r *InstanceReconciler) findings(ctx context.Context, exp drift.Expected, hints []drift.Hint) ([]drift.Finding, time.Time, drift.UnitFacts, error) {
	us, err := r.Applier.Systemd.UnitState(ctx, exp.Profile.Unit)
	if err != nil {
		return nil, time.Time{}, drift.UnitFacts{}, err
	}
	found := drift.Read(r.Applier.Host, exp)
	found.Unit = drift.UnitFacts{ActiveState: us.ActiveState, SubState: us.SubState, MainPID: us.MainPID,
		Loaded: us.DropInPaths, NeedDaemonReload: us.NeedDaemonReload}
	fs := drift.Compare(exp, found)
	at := time.Now()
	for _, h := range hints {
		if h.At.Before(at) {
			at = h.At
		}
	}
	fs = append(fs, r.trees.findings(r.Applier.Host, exp.Profile.Name, hints)...)
	return fs, at, found.Unit, nil
}

// reportDrift says at once what changed: the Drifted condition (Isolated False for a unit file
// or drop-in, the main PID as systemd has it now) and, unless these findings were reported
// already, a Warning event and the counter. With onlyFresh, findings reported already are
// not written again.
func (r *InstanceReconciler) reportDrift(ctx context.Context, gi *v1.GatewayInstance, in apply.Instance, policy v1.DriftPolicy, fs []drift.Finding, at time.Time, onlyFresh bool) error {
	profile := gi.Spec.Profile
	summary := drift.Summary(at, fs)
	fresh := r.Drift.Fresh(profile, fs)
	if fresh {
		for _, f := range fs {
			driftTotal.WithLabelValues(profile, string(f.Kind)).Inc()
		}
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, "Drifted", "Detect", "%s", truncate(summary))
		ctrl.LoggerFrom(ctx).Info("drift", "profile", profile, "findings", summary, "policy", policy)
	} else if onlyFresh {
		return nil
	}
	base := gi.DeepCopy()
	st := &gi.Status
	v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionTrue, reasonOf(fs), truncate(summary))
	if in.Isolation != v1.IsolationConvenience && overrides(fs) {
		v1.SetCondition(gi, v1.ConditionIsolated, metav1.ConditionFalse, "Overridden",
			truncate("a unit file or drop-in changed behind the agent's back and may weaken the sandbox: "+summary))
	}
	for _, f := range fs {
		switch f.Kind {
		case drift.KindProcess:
			var pid int64
			_, _ = fmt.Sscan(f.Found, &pid)
			st.MainPID = pid
		case drift.KindState:
			if drift.Has(fs, drift.KindProcess) {
				continue
			}
			st.MainPID = 0
			v1.SetCondition(gi, v1.ConditionReady, metav1.ConditionFalse, "NotRunning", f.String())
		}
	}
	return r.patchStatus(ctx, gi, base)
}

// handleDrift reports findings at once, then heals or reproves by policy.
func (r *InstanceReconciler) handleDrift(ctx context.Context, gi *v1.GatewayInstance, in apply.Instance, policy v1.DriftPolicy, fs []drift.Finding, at time.Time) (ctrl.Result, error) {
	log := ctrl.LoggerFrom(ctx)
	profile := gi.Spec.Profile
	summary := drift.Summary(at, fs)
	// The condition is written before anything is healed: the change is visible at once.
	if err := r.reportDrift(ctx, gi, in, policy, fs, at, false); err != nil {
		return ctrl.Result{}, err
	}
	base := gi.DeepCopy()
	running := gi.Status.MainPID != 0
	switch {
	case drift.OnlyProcess(fs) && running:
		// systemd started the gateway again from the files as rendered: prove the new process.
		out, err := r.Applier.Reprove(ctx, in)
		res, _, err := r.finishDrift(ctx, gi, base, out, err, fs, at)
		return res, err
	case policy == v1.DriftReport:
		v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionTrue, "Reported",
			truncate(summary+"; left as found (spec.drift is Report)"))
		return ctrl.Result{RequeueAfter: r.reproveInterval()}, r.patchStatus(ctx, gi, base)
	}
	if drift.Has(fs, drift.KindRelease) {
		restart, left, err := r.healTrees(ctx, in, fs)
		if err != nil {
			return ctrl.Result{}, err
		}
		if left == len(fs) {
			// Only a last-good tree changed: the gateway does not run it, and no URL for it is known.
			v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionTrue, "Reported",
				truncate(summary+"; left as found (the instance names no URL for its last-good release)"))
			return ctrl.Result{RequeueAfter: r.reproveInterval()}, r.patchStatus(ctx, gi, base)
		}
		in.Restart = in.Restart || restart
	}
	if drift.Has(fs, drift.KindDropIn) || drift.Has(fs, drift.KindLoaded) {
		moved, err := r.Applier.SetAsideDropIns(ctx, profile)
		if len(moved) > 0 {
			r.Recorder.Eventf(gi, nil, corev1.EventTypeNormal, "DropInSetAside", "Heal",
				"renamed drop-ins the agent did not write to <name>.drifted: %s", strings.Join(moved, ", "))
		}
		if err != nil {
			log.Error(err, "setting drop-ins aside", "profile", profile)
		}
	}
	in.Heal = true
	applyCtx, cancel := context.WithTimeout(ctx, r.applyTimeout())
	out, err := r.Applier.Apply(applyCtx, in)
	cancel()
	res, _, err := r.finishDrift(ctx, gi, base, out, err, fs, at)
	return res, err
}

// finishDrift reports the outcome of a heal or a re-prove.
func (r *InstanceReconciler) finishDrift(ctx context.Context, gi, base *v1.GatewayInstance, out *apply.Outcome, err error, fs []drift.Finding, at time.Time) (ctrl.Result, bool, error) {
	var failure *apply.Failure
	switch {
	case err == nil:
		r.reportSuccess(gi, out)
		r.expectDrift(ctx, gi.Spec.Profile, out)
		if out.Restarted {
			r.Recorder.Eventf(gi, nil, corev1.EventTypeNormal, "Restarted", "Heal",
				"restarted %s and proved it aligned (main PID %d)", gi.Status.Unit, out.MainPID)
		}
		if len(fs) > 0 {
			reason, what := "Healed", "put back what was rendered"
			if drift.OnlyProcess(fs) && !out.Restarted {
				reason, what = "Reproven", fmt.Sprintf("proved the new main process %d", out.MainPID)
			}
			v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionFalse, reason,
				truncate(fmt.Sprintf("%s at %s; %s", what, now(), drift.Summary(at, fs))))
			r.Recorder.Eventf(gi, nil, corev1.EventTypeNormal, reason, "Heal", "%s (main PID %d)", what, out.MainPID)
		}
	case errors.As(err, &failure):
		r.reportFailure(gi, failure, out)
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, failure.Reason, "Heal", "%s", failure.Error())
		if len(fs) > 0 && !drift.OnlyProcess(fs) {
			v1.SetCondition(gi, v1.ConditionDrifted, metav1.ConditionTrue, "HealFailed",
				truncate(drift.Summary(at, fs)+"; healing failed: "+failure.Error()))
		}
	default:
		return ctrl.Result{}, true, err
	}
	if out != nil {
		r.serveToolRuns(gi, out)
	}
	if perr := r.patchStatus(ctx, gi, base); perr != nil {
		return ctrl.Result{}, true, perr
	}
	return ctrl.Result{RequeueAfter: r.reproveInterval()}, true, nil
}

func (r *InstanceReconciler) patchStatus(ctx context.Context, gi, base *v1.GatewayInstance) error {
	if err := r.Client.Status().Patch(ctx, gi, client.MergeFrom(base)); err != nil {
		return fmt.Errorf("write status: %w", err)
	}
	return nil
}

func (r *InstanceReconciler) applyTimeout() time.Duration {
	if r.ApplyTimeout > 0 {
		return r.ApplyTimeout
	}
	return DefaultApplyTimeout
}

// overrides tells whether a finding may change the unit's sandbox: a unit file or drop-in.
func overrides(fs []drift.Finding) bool {
	for _, f := range fs {
		if f.Kind == drift.KindDropIn || f.Kind == drift.KindUnit || (f.Kind == drift.KindLoaded && strings.HasSuffix(f.What, "DropInPaths")) {
			return true
		}
	}
	return false
}

// reasonOf names the first finding's kind as a condition reason: EnvChanged, DropInChanged...
func reasonOf(fs []drift.Finding) string {
	switch fs[0].Kind {
	case drift.KindEnv:
		return "EnvChanged"
	case drift.KindDropIn:
		return "DropInChanged"
	case drift.KindUnit:
		return "UnitFileChanged"
	case drift.KindLink:
		return "LinkChanged"
	case drift.KindLauncher:
		return "LauncherChanged"
	case drift.KindRelease:
		return "ReleaseChanged"
	case drift.KindProcess:
		return "MainPIDChanged"
	case drift.KindState:
		return "NotRunning"
	}
	return "LoadedUnitChanged"
}

// conditionMessageMax keeps a condition message within the API's bound.
const conditionMessageMax = 32000

func truncate(s string) string {
	if len(s) <= conditionMessageMax {
		return s
	}
	return s[:conditionMessageMax] + "…"
}

func now() string { return time.Now().UTC().Format(time.RFC3339Nano) }
