package controllers

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/recorder"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// ReleaseReconciler marks Releases Ready and keeps a Release that profiles still reference.
type ReleaseReconciler struct {
	Client   client.Client
	Recorder recorder.EventRecorder
}

// SetupWithManager registers the reconciler; a profile's change of release (or its creation
// or deletion) wakes the releases it named.
func (r *ReleaseReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		For(&v1.Release{}).
		Watches(&v1.GatewayProfile{}, releasesOfProfile()).
		Complete(r)
}

// Reconcile validates a Release and guards its deletion.
func (r *ReleaseReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var rel v1.Release
	if err := r.Client.Get(ctx, req.NamespacedName, &rel); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	users, err := r.profilesUsing(ctx, rel.Name)
	if err != nil {
		return ctrl.Result{}, err
	}
	base := rel.DeepCopy()
	rel.Status.ObservedGeneration = rel.Generation
	rel.Status.Profiles = users
	set := func(s metav1.ConditionStatus, reason, msg string) {
		v1.SetCondition(&rel, v1.ConditionReady, s, reason, msg)
	}

	if !rel.DeletionTimestamp.IsZero() {
		if len(users) > 0 {
			msg := fmt.Sprintf("deletion waits: still used by GatewayProfiles %s", strings.Join(users, ", "))
			set(metav1.ConditionFalse, "InUse", msg)
			if !equality.Semantic.DeepEqual(base.Status, rel.Status) {
				r.Recorder.Eventf(&rel, nil, corev1.EventTypeWarning, "DeletionBlocked", "Delete", "%s", msg)
			}
			return ctrl.Result{}, r.patchStatus(ctx, base, &rel)
		}
		if controllerutil.RemoveFinalizer(&rel, v1.FinalizerReleaseInUse) {
			return ctrl.Result{}, client.IgnoreNotFound(r.Client.Update(ctx, &rel))
		}
		return ctrl.Result{}, nil
	}
	if controllerutil.AddFinalizer(&rel, v1.FinalizerReleaseInUse) {
		if err := r.Client.Update(ctx, &rel); err != nil {
			return ctrl.Result{}, err
		}
		base.Finalizers, base.ResourceVersion = rel.Finalizers, rel.ResourceVersion
	}
	if err := validateRelease(&rel); err != nil {
		set(metav1.ConditionFalse, "Invalid", err.Error())
	} else {
		set(metav1.ConditionTrue, "Valid", fmt.Sprintf("release %s (%s) is ready to roll out", rel.Spec.Label, rel.Spec.SHA256[:12]))
	}
	return ctrl.Result{}, r.patchStatus(ctx, base, &rel)
}

// validateRelease repeats the schema's checks, for objects written before a schema change.
func validateRelease(rel *v1.Release) error {
	u, err := url.Parse(rel.Spec.Source.URL)
	if err != nil {
		return fmt.Errorf("source.url: %w", err)
	}
	var errs []error
	if u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "file" {
		errs = append(errs, fmt.Errorf("source.url: scheme %q is not http, https or file", u.Scheme))
	}
	errs = append(errs, v1.ValidateSHA256(rel.Spec.SHA256), v1.ValidateReleaseLabel(rel.Spec.Label))
	return errors.Join(errs...)
}

func (r *ReleaseReconciler) profilesUsing(ctx context.Context, name string) ([]string, error) {
	var list v1.GatewayProfileList
	if err := r.Client.List(ctx, &list, client.MatchingFields{indexProfileRelease: name}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	var names []string
	for _, p := range list.Items {
		names = append(names, p.Name)
	}
	sort.Strings(names)
	return names, nil
}

func (r *ReleaseReconciler) patchStatus(ctx context.Context, base, rel *v1.Release) error {
	if equality.Semantic.DeepEqual(base.Status, rel.Status) {
		return nil
	}
	return client.IgnoreNotFound(r.Client.Status().Patch(ctx, rel, client.MergeFrom(base)))
}
