package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Reasons an instance's material cannot be applied yet. The host keeps running what it runs;
// the instance's Ready condition says why, and the agent tries again.
const (
	// ReasonMaterialUnavailable: the agent may not (yet) get an object, or the API server
	// could not be asked. The controller manager grants access when the instance names it.
	ReasonMaterialUnavailable = "MaterialUnavailable"
	// ReasonMaterialChanged: the objects do not hold what the controller rolled out (their
	// digest differs); the controller is about to roll out the new material.
	ReasonMaterialChanged = "MaterialChanged"
)

// materialRetry is how soon material that is not ready is looked at again.
const materialRetry = 5

// materialWait says why an instance's material cannot be applied now. Its message names
// objects and keys, never a value.
type materialWait struct{ reason, msg string }

// material gets the Secrets and ConfigMaps the instance names, one GET each, and resolves them
// into the env and files to apply, checking their digest against the instance's.
func (r *InstanceReconciler) material(ctx context.Context, gi *v1.GatewayInstance) (v1.Material, *materialWait) {
	src := gi.Spec.Material
	if src == nil {
		return v1.Material{}, &materialWait{v1.ReasonMaterialInvalid, "the instance names Secrets or ConfigMaps but carries no material digest"}
	}
	if err := gi.Spec.ValidateMaterialIsolation(); err != nil {
		return v1.Material{}, &materialWait{v1.ReasonMaterialInvalid, err.Error()}
	}
	secNames, cmNames := gi.Spec.MaterialRefs()
	secrets := map[string]*corev1.Secret{}
	configMaps := map[string]*corev1.ConfigMap{}
	get := func(kind, name string, obj client.Object) *materialWait {
		err := r.Reader.Get(ctx, client.ObjectKey{Namespace: src.Namespace, Name: name}, obj)
		switch {
		case err == nil:
			return nil
		case apierrors.IsNotFound(err):
			obj.SetName("")
			return nil
		case apierrors.IsForbidden(err):
			return &materialWait{ReasonMaterialUnavailable, fmt.Sprintf("this host may not get %s %s/%s (yet): the controller manager grants it to the hosts that run the profile", kind, src.Namespace, name)}
		default:
			return &materialWait{ReasonMaterialUnavailable, fmt.Sprintf("get %s %s/%s: %v", kind, src.Namespace, name, err)}
		}
	}
	for _, n := range secNames {
		var s corev1.Secret
		if w := get("Secret", n, &s); w != nil {
			return v1.Material{}, w
		}
		if s.Name != "" {
			secrets[n] = &s
		}
	}
	for _, n := range cmNames {
		var c corev1.ConfigMap
		if w := get("ConfigMap", n, &c); w != nil {
			return v1.Material{}, w
		}
		if c.Name != "" {
			configMaps[n] = &c
		}
	}
	m, err := v1.ResolveMaterial(&gi.Spec.GatewaySettings, secrets, configMaps)
	var me *v1.MaterialError
	switch {
	case errors.As(err, &me):
		return v1.Material{}, &materialWait{me.Reason, me.Msg}
	case err != nil:
		return v1.Material{}, &materialWait{v1.ReasonMaterialInvalid, err.Error()}
	case m.Digest != src.Digest:
		return v1.Material{}, &materialWait{ReasonMaterialChanged,
			"the Secrets and ConfigMaps changed since this instance was written; waiting for the controller to roll out the new material"}
	}
	return m, nil
}

// waitForMaterial reports why the instance is not applied and looks again soon. Nothing on the
// host changes: the gateway keeps the material it started with. The status keeps its
// observedGeneration, so the rollout sees a host still on its way, not a failed one, until its
// progress deadline.
func (r *InstanceReconciler) waitForMaterial(ctx context.Context, gi *v1.GatewayInstance, w *materialWait) (ctrl.Result, error) {
	ctrl.LoggerFrom(ctx).Info("material not ready; the gateway keeps what it runs", "reason", w.reason, "message", w.msg)
	if w.reason == ReasonMaterialChanged && gi.Status.ObservedGeneration == gi.Generation && gi.Status.ConfigHash == gi.Spec.ConfigHash {
		// A rotation the controller has not brought to this host yet: the gateway runs this
		// very spec, proven, and the status says so still; a retry asked for is answered by
		// it. The new instance spec will wake the agent.
		if token := v1.RequestToken(gi.Annotations[v1.AnnotationRetry]); token != gi.Status.LastHandledRetry {
			base := gi.DeepCopy()
			gi.Status.LastHandledRetry = token
			if err := r.Client.Status().Patch(ctx, gi, client.MergeFrom(base)); err != nil {
				return ctrl.Result{}, fmt.Errorf("write status: %w", err)
			}
		}
		return ctrl.Result{RequeueAfter: r.reproveInterval()}, nil
	}
	base := gi.DeepCopy()
	msg := w.msg + "; the gateway keeps the material it runs"
	if v1.SetCondition(gi, v1.ConditionReady, metav1.ConditionFalse, w.reason, msg) {
		r.Recorder.Eventf(gi, nil, corev1.EventTypeWarning, w.reason, "Apply", "%s", msg)
	}
	if err := r.Client.Status().Patch(ctx, gi, client.MergeFrom(base)); err != nil {
		return ctrl.Result{}, fmt.Errorf("write status: %w", err)
	}
	return ctrl.Result{RequeueAfter: materialRetry * time.Second}, nil
}
