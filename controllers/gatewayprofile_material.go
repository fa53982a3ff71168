package controllers

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Indexes of profiles by the Secrets and ConfigMaps they name, so a change of one wakes only
// the profiles that use it.
const (
	indexProfileSecrets    = "material.secrets"
	indexProfileConfigMaps = "material.configmaps"
)

// material reads the Secrets and ConfigMaps the profile names and returns where they are and
// their digest, nil when it names none, and records in the profile's status which versions of
// them it read. A *v1.MaterialError says what is missing or refused, without a value.
func (r *GatewayProfileReconciler) material(ctx context.Context, p *v1.GatewayProfile) (*v1.MaterialSource, error) {
	secNames, cmNames := p.Spec.MaterialRefs()
	if len(secNames)+len(cmNames) == 0 {
		p.Status.Material = nil
		return nil, nil
	}
	if err := p.Spec.ValidateMaterialIsolation(); err != nil {
		return nil, err
	}
	if r.MaterialNamespace == "" {
		return nil, &v1.MaterialError{Reason: v1.ReasonMaterialInvalid,
			Msg: "the manager runs without --material-namespace: profiles cannot name Secrets or ConfigMaps"}
	}
	secrets := map[string]*corev1.Secret{}
	for _, n := range secNames {
		var s corev1.Secret
		if err := r.get(ctx, n, &s); err != nil {
			return nil, err
		}
		if s.Name != "" {
			secrets[n] = &s
		}
	}
	cms := map[string]*corev1.ConfigMap{}
	for _, n := range cmNames {
		var c corev1.ConfigMap
		if err := r.get(ctx, n, &c); err != nil {
			return nil, err
		}
		if c.Name != "" {
			cms[n] = &c
		}
	}
	m, err := v1.ResolveMaterial(&p.Spec.GatewaySettings, secrets, cms)
	if err != nil {
		return nil, err
	}
	st := &v1.ProfileMaterial{Digest: m.Digest}
	for _, n := range secNames {
		st.Objects = append(st.Objects, v1.MaterialObject{Kind: "Secret", Name: n, ResourceVersion: secrets[n].ResourceVersion})
	}
	for _, n := range cmNames {
		st.Objects = append(st.Objects, v1.MaterialObject{Kind: "ConfigMap", Name: n, ResourceVersion: cms[n].ResourceVersion})
	}
	p.Status.Material = st
	return &v1.MaterialSource{Namespace: r.MaterialNamespace, Digest: m.Digest}, nil
}

// get reads one object of the material namespace from the cache; a missing one leaves obj
// empty, so the resolver names it. One being deleted counts as missing.
func (r *GatewayProfileReconciler) get(ctx context.Context, name string, obj client.Object) error {
	err := r.Client.Get(ctx, client.ObjectKey{Namespace: r.MaterialNamespace, Name: name}, obj)
	switch {
	case apierrors.IsNotFound(err):
		obj.SetName("")
		return nil
	case err != nil:
		return fmt.Errorf("read %s/%s: %w", r.MaterialNamespace, name, err)
	case !obj.GetDeletionTimestamp().IsZero():
		obj.SetName("")
	}
	return nil
}

// profilesOfMaterial maps a Secret or ConfigMap of the material namespace to the profiles that
// name it.
func (r *GatewayProfileReconciler) profilesOfMaterial(index string) handler.MapFunc {
	return func(ctx context.Context, o client.Object) []reconcile.Request {
		if o.GetNamespace() != r.MaterialNamespace {
			return nil
		}
		var list v1.GatewayProfileList
		if err := r.Client.List(ctx, &list, client.MatchingFields{index: o.GetName()}, client.UnsafeDisableDeepCopy); err != nil {
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(list.Items))
		for _, p := range list.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKey{Name: p.Name}})
		}
		return reqs
	}
}

// profileSecrets and profileConfigMaps are the index functions of the two indexes.
func profileSecrets(o client.Object) []string {
	s, _ := o.(*v1.GatewayProfile).Spec.MaterialRefs()
	return s
}

func profileConfigMaps(o client.Object) []string {
	_, c := o.(*v1.GatewayProfile).Spec.MaterialRefs()
	return c
}
