package controllers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/controllers/rollout"
)

// annotationMovedAt, kept on instances, is when the instance's spec was moved to its current
// target; the progress deadline counts from it.
const (
	annotationMovedAt = "gateway.agent.dev/moved-at"
	historyLength     = 10
)

// rollout moves hosts to the profile's target as the planner decides, acts on the operator's
// requests (promote, resume, abort: each once per token), and records the rollout's state in
// the profile's status, which the caller writes.
func (r *GatewayProfileReconciler) rollout(ctx context.Context, p *v1.GatewayProfile, rel *v1.Release, tmpl templateSpec,
	hosts []v1.GatewayHost, canary labels.Selector, instances map[string]*v1.GatewayInstance) (ctrl.Result, error) {
	now := time.Now()
	key := tmpl.key
	st := r.beginRollout(p, rel, key, now)
	if p.Status.LastHandled == nil {
		p.Status.LastHandled = &v1.HandledRequests{}
	}
	handled := p.Status.LastHandled

	if token, ok := v1.Requested(p, v1.AnnotationAbort, handled.Abort); ok {
		if err := r.abort(ctx, p, tmpl.spec.Material, instances); err != nil {
			return ctrl.Result{}, err
		}
		handled.Abort = token
		return ctrl.Result{}, nil
	}
	if st.Phase == v1.RolloutAborted {
		return ctrl.Result{}, nil // nothing moves until the spec names a new target
	}
	promoteToken, promote := v1.Requested(p, v1.AnnotationPromote, handled.Promote)
	resumeToken, resume := v1.Requested(p, v1.AnnotationResume, handled.Resume)

	in := rollout.Input{Profile: p.Name, Key: key, Strategy: p.Spec.Rollout, Now: now,
		Instances: map[string]rollout.Instance{}, Promoted: st.Promoted, Promote: promote, Rollback: rollingBack(p, rel)}
	if st.StartTime != nil {
		// Seconds, as the moved-at stamps and the stored status: a host moved in the first
		// second of this rollout belongs to it.
		in.Started = st.StartTime.Truncate(time.Second)
	}
	if st.PauseTime != nil {
		t := st.PauseTime.Time
		in.PauseTime = &t
	}
	for _, h := range hosts {
		reach := meta.FindStatusCondition(h.Status.Conditions, v1.ConditionReachable)
		in.Hosts = append(in.Hosts, rollout.Host{Name: h.Name, Unschedulable: h.Spec.Unschedulable,
			Reachable: reach == nil || reach.Status != metav1.ConditionFalse,
			Canary:    canary != nil && canary.Matches(labels.Set(h.Labels))})
		if gi, ok := instances[h.Name]; ok {
			in.Instances[h.Name] = viewOf(gi, tmpl.hashFor(h.Name)).planned()
		}
	}

	if resume {
		if err := r.retryFailed(ctx, p, instances, in, now); err != nil {
			return ctrl.Result{}, err
		}
		handled.Resume = resumeToken
		return ctrl.Result{RequeueAfter: replan}, nil
	}

	d := rollout.Plan(in)
	desired := make(map[string]v1.GatewayInstanceSpec, len(d.Move))
	for _, host := range d.Move {
		desired[host] = tmpl.forHost(host)
	}
	if err := r.moveAll(ctx, p, instances, d.Move, desired, now); err != nil {
		return ctrl.Result{}, err
	}
	for _, host := range d.Retry {
		if err := r.retry(ctx, p, instances, host, now, "the target of a new rollout"); err != nil {
			return ctrl.Result{}, err
		}
	}
	r.record(p, st, d, now)
	if promote {
		handled.Promote = promoteToken
		if !d.EndPause {
			r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "PromoteIgnored", "Promote",
				"request %s: no canary pause to end (%s)", promoteToken, st.Step)
		}
	}
	return ctrl.Result{RequeueAfter: d.RequeueAfter}, nil
}

// beginRollout returns the status of the rollout toward key, starting a new one (and filing
// the previous one in the history) when the target changed.
func (r *GatewayProfileReconciler) beginRollout(p *v1.GatewayProfile, rel *v1.Release, key string, now time.Time) *v1.RolloutStatus {
	st := p.Status.Rollout
	if st != nil && st.Key == key {
		return st
	}
	to := &v1.ReleaseSummary{Name: rel.Name, Label: rel.Spec.Label, SHA256: rel.Spec.SHA256}
	var from *v1.ReleaseSummary
	if st != nil {
		result := "Superseded"
		if st.Phase == v1.RolloutComplete || st.Phase == v1.RolloutAborted {
			result = string(st.Phase)
		}
		if st.To != nil {
			from = st.To.DeepCopy()
		}
		// An unfinished rollout left most hosts where it started: that release, not the one
		// it was heading for, is where the next one starts from (and where an abort returns).
		if st.Phase != v1.RolloutComplete && st.From != nil {
			from = st.From.DeepCopy()
		}
		end := metav1.NewTime(now)
		p.Status.History = append([]v1.RolloutRecord{{From: st.From, To: st.To, StartTime: st.StartTime, EndTime: &end, Result: result}}, p.Status.History...)
		if len(p.Status.History) > historyLength {
			p.Status.History = p.Status.History[:historyLength]
		}
	}
	start := metav1.NewTime(now)
	p.Status.Rollout = &v1.RolloutStatus{Key: key, From: from, To: to, StartTime: &start, Phase: v1.RolloutProgressing}
	r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "RolloutStarted", "Rollout", "rolling out release %s (config %s)%s",
		rel.Spec.Label, key, fromText(from))
	return p.Status.Rollout
}

func fromText(from *v1.ReleaseSummary) string {
	if from == nil {
		return ""
	}
	return " from " + from.Label
}

// moveAll points the instances of hosts at their desired specs, creating missing ones. The
// writes go out a few at a time in parallel: a wave of a large rollout is hundreds of hosts.
func (r *GatewayProfileReconciler) moveAll(ctx context.Context, p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance, hosts []string, desired map[string]v1.GatewayInstanceSpec, now time.Time) error {
	type job struct {
		host     string
		gi, base *v1.GatewayInstance // base is nil for a new instance
	}
	stamp := now.UTC().Format(time.RFC3339)
	var jobs []job
	for _, host := range hosts {
		want := desired[host]
		cur, exists := instances[host]
		switch {
		case !exists:
			gi := newInstance(p, want)
			gi.Annotations = map[string]string{annotationMovedAt: stamp}
			jobs = append(jobs, job{host: host, gi: gi})
		case !cur.DeletionTimestamp.IsZero() || equality.Semantic.DeepEqual(cur.Spec, want):
		default:
			// The listed instance is the cache's own copy: change a copy.
			gi := cur.DeepCopy()
			if gi.Annotations == nil {
				gi.Annotations = map[string]string{}
			}
			gi.Annotations[annotationMovedAt] = stamp
			gi.Spec = want
			jobs = append(jobs, job{host: host, gi: gi, base: cur})
		}
	}
	errs := make([]error, len(jobs))
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if j.base == nil {
				if err := r.Client.Create(ctx, j.gi); err != nil {
					errs[i] = fmt.Errorf("create instance %s: %w", j.gi.Name, err)
				}
				return
			}
			if err := r.Client.Patch(ctx, j.gi, client.MergeFrom(j.base)); err != nil {
				errs[i] = fmt.Errorf("update instance %s: %w", j.gi.Name, err)
			}
		}()
	}
	wg.Wait()
	// One event per wave, not per host: on a large fleet per-host events were most of the
	// manager's writes and of the memory its event recorder keeps.
	var created, updated []string
	for i, j := range jobs {
		if errs[i] != nil {
			continue
		}
		instances[j.host] = j.gi
		if j.base == nil {
			created = append(created, j.host)
		} else {
			updated = append(updated, j.host)
		}
	}
	if len(jobs) > 0 {
		spec := jobs[0].gi.Spec
		if len(created) > 0 {
			r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "InstanceCreated", "Rollout",
				"%d host(s) selected, instances created on release %s: %s", len(created), spec.Release.Label, hostList(created))
		}
		if len(updated) > 0 {
			r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "InstanceUpdated", "Rollout",
				"%d host(s) moved to release %s and the profile's current settings: %s", len(updated), spec.Release.Label, hostList(updated))
		}
	}
	return errors.Join(errs...)
}

// record writes the planner's decision into the profile's status, with an event for each
// change of phase.
func (r *GatewayProfileReconciler) record(p *v1.GatewayProfile, st *v1.RolloutStatus, d rollout.Decision, now time.Time) {
	was := st.Phase
	st.Phase, st.Step = d.Phase, d.Step
	st.UpdatedHosts, st.PendingHosts, st.FailedHosts = count32(d.Updated), count32(d.Pending), count32(d.Failed)
	st.Failed = d.FailedHosts
	if len(st.Failed) > 10 {
		st.Failed = st.Failed[:10]
	}
	if d.StartPause {
		t := metav1.NewTime(now)
		st.PauseTime = &t
	}
	if d.EndPause {
		st.Promoted = true
		r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "CanaryPromoted", "Rollout", "canary promoted; the rest of the hosts follow")
	}
	paused := metav1.ConditionFalse
	if st.Phase == v1.RolloutPaused {
		paused = metav1.ConditionTrue
	}
	v1.SetCondition(p, v1.ConditionPaused, paused, string(st.Phase), st.Step)
	if was == st.Phase {
		return
	}
	switch st.Phase {
	case v1.RolloutHalted:
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "RolloutHalted", "Rollout",
			"rollout of %s halted: %s", st.To.Label, hostList(d.FailedHosts))
	case v1.RolloutPaused:
		r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "RolloutPaused", "Rollout", "%s", st.Step)
	case v1.RolloutComplete:
		r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "RolloutComplete", "Rollout", "release %s runs on every selected host", st.To.Label)
	}
}

// retryFailed asks the agents of failed hosts to apply again, and restarts their deadline.
func (r *GatewayProfileReconciler) retryFailed(ctx context.Context, p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance, in rollout.Input, now time.Time) error {
	for host, f := range in.Instances {
		deadline := time.Duration(p.Spec.Rollout.ProgressDeadlineSeconds) * time.Second
		late := f.OnTarget && !f.Aligned && !f.MovedAt.IsZero() && deadline > 0 && now.Sub(f.MovedAt) > deadline
		if !f.OnTarget || (!f.Degraded && !late) {
			continue
		}
		if err := r.retry(ctx, p, instances, host, now, "resumed"); err != nil {
			return err
		}
	}
	return nil
}

// retry asks a host's agent to apply its instance again with a new retry token, and restarts
// its deadline. Until the agent reports that token handled, the instance counts as moving.
func (r *GatewayProfileReconciler) retry(ctx context.Context, p *v1.GatewayProfile, instances map[string]*v1.GatewayInstance, host string, now time.Time, why string) error {
	cur := instances[host]
	gi := cur.DeepCopy()
	if gi.Annotations == nil {
		gi.Annotations = map[string]string{}
	}
	gi.Annotations[v1.AnnotationRetry] = now.UTC().Format(time.RFC3339Nano)
	gi.Annotations[annotationMovedAt] = now.UTC().Format(time.RFC3339)
	if err := r.Client.Patch(ctx, gi, client.MergeFrom(cur)); err != nil {
		return err
	}
	instances[host] = gi
	r.Recorder.Eventf(p, gi, corev1.EventTypeNormal, "Retry", "Rollout", "%s: %s applies release %s again", why, gi.Spec.Host, gi.Spec.Release.Label)
	return nil
}

// rollingBack is true when the rollout returns to the release its unfinished predecessor
// started from: that release ran on these hosts already.
func rollingBack(p *v1.GatewayProfile, rel *v1.Release) bool {
	st, h := p.Status.Rollout, p.Status.History
	return st != nil && st.From != nil && st.From.SHA256 == rel.Spec.SHA256 &&
		len(h) > 0 && h[0].Result != string(v1.RolloutComplete) && h[0].To != nil && h[0].To.SHA256 != rel.Spec.SHA256
}

// abort returns every host already moved to the target to the release the rollout started
// from, at once, and stops the rollout until the spec names a new target. The material stays
// the current one: a bad Secret is mended by changing it, which rolls out again.
func (r *GatewayProfileReconciler) abort(ctx context.Context, p *v1.GatewayProfile, mat *v1.MaterialSource, instances map[string]*v1.GatewayInstance) error {
	st := p.Status.Rollout
	if st.From == nil {
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "AbortRefused", "Abort", "nothing to return to: this is the profile's first rollout")
		return nil
	}
	var prev v1.Release
	if err := r.Client.Get(ctx, client.ObjectKey{Name: st.From.Name}, &prev); err != nil {
		return fmt.Errorf("abort: the previous release %s: %w", st.From.Name, err)
	}
	if st.Phase != v1.RolloutAborted {
		// Should the status not be written after the hosts moved back, the request is still
		// unhandled and the next reconcile aborts again: moving back is idempotent.
		st.Phase = v1.RolloutAborted
		st.Step = fmt.Sprintf("aborted: every host returns to %s; set spec.release to roll out again", st.From.Label)
		v1.SetCondition(p, v1.ConditionPaused, metav1.ConditionFalse, "Aborted", st.Step)
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "RolloutAborted", "Abort", "%s", st.Step)
	}
	tmpl := profileSpec(p, &prev, mat)
	desired := map[string]v1.GatewayInstanceSpec{}
	var back []string
	for host, gi := range instances {
		if gi.Spec.Release.SHA256 != prev.Spec.SHA256 {
			desired[host] = tmpl.forHost(host)
			back = append(back, host)
		}
	}
	return r.moveAll(ctx, p, instances, back, desired, time.Now())
}
