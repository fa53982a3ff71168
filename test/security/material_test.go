package security_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/poll"
)

const (
	materialNS     = "gateway-operator-system"
	accessPolicy   = "gateway-manager-agent-access"
	materialSecret = "sec-creds"
)

// newWatchUser is newUser with a client that can also watch.
func newWatchUser(t *testing.T, name string, groups ...string) client.WithWatch {
	t.Helper()
	u, err := cp.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.NewWithWatch(u.Config(), client.Options{Scheme: cp.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// reads tries every way an identity could read a Secret or ConfigMap of the material namespace
// and returns the error of each.
func reads(ctx context.Context, c client.WithWatch, obj client.Object, list client.ObjectList) map[string]error {
	errs := map[string]error{}
	errs["get"] = c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: obj.GetName()}, obj)
	errs["list"] = c.List(ctx, list, client.InNamespace(materialNS))
	w, err := c.Watch(ctx, list, client.InNamespace(materialNS), client.MatchingFields{"metadata.name": obj.GetName()})
	if err == nil {
		w.Stop()
	}
	errs["watch"] = err
	errs["list all namespaces"] = c.List(ctx, list)
	return errs
}

// TestMaterialReadableOnlyByTheHostsThatRunIt: the controller manager, under its own identity,
// role and admission policy, lets exactly the agents of the hosts a profile selects get the
// profile's Secret and ConfigMap; an unselected host cannot get, list or watch them, nor can a
// DaemonSet agent; a host that leaves the selection loses access.
func TestMaterialReadableOnlyByTheHostsThatRunIt(t *testing.T) {
	toolRunSetUp(t) // applies the manager policies
	ctx := context.Background()
	for _, h := range []struct{ name, role string }{{"node-s1", "secret"}, {"node-s2", "secret"}, {"node-s3", "plain"}} {
		gh := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: h.name, Labels: map[string]string{"role": h.role}}}
		if err := admin.Create(ctx, gh); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, gh)
	}
	objs := []client.Object{
		&v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "sec-r1"}, Spec: v1.ReleaseSpec{
			Source: v1.ReleaseSource{URL: "https://example.com/a.tgz"}, SHA256: sha, Label: "1.0.0"}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: materialSecret, Labels: map[string]string{v1.MaterialLabel: "true"}},
			Data: map[string][]byte{"token": []byte("hunter2-material")}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "unrelated", Labels: map[string]string{v1.MaterialLabel: "true"}},
			Data: map[string][]byte{"token": []byte("x")}},
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: "sec-config", Labels: map[string]string{v1.MaterialLabel: "true"}},
			Data: map[string]string{"app.yaml": "a: 1\n"}},
	}
	for _, o := range objs {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	p := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "sec"}, Spec: v1.GatewayProfileSpec{
		Release: "sec-r1", NodeSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "secret"}}}}
	p.Spec.Env = []v1.EnvVar{{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: materialSecret, Key: "token"}}}}
	p.Spec.Files = []v1.FileSource{{Path: "config/app.yaml", ConfigMapKeyRef: &v1.KeySelector{Name: "sec-config", Key: "app.yaml"}}}
	if err := admin.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	defer releaseProfile(t, "sec")

	s1 := newWatchUser(t, "system:gateway-agent:node-s1", agentGroup)
	s2 := newWatchUser(t, "system:gateway-agent:node-s2", agentGroup)
	s3 := newWatchUser(t, "system:gateway-agent:node-s3", agentGroup)
	ds := newWatchUser(t, daemonSA, "system:serviceaccounts", "system:serviceaccounts:gateway-operator-system")

	runManager(t)

	// Written by the manager under its role and the policy: a refusal of either times out here.
	for _, c := range []client.WithWatch{s1, s2} {
		poll.Until(t, "a selected host's agent to get the Secret and the ConfigMap", 90*time.Second, func() (bool, string) {
			e1 := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: materialSecret}, &corev1.Secret{})
			e2 := c.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: "sec-config"}, &corev1.ConfigMap{})
			return e1 == nil && e2 == nil, fmt.Sprint(e1, e2)
		})
	}
	forbidden := func(who string, errs map[string]error, except ...string) {
		t.Helper()
		for verb, err := range errs {
			if len(except) > 0 && verb == except[0] {
				continue
			}
			if !apierrors.IsForbidden(err) {
				t.Errorf("%s: %s: want Forbidden, got %v", who, verb, err)
			}
		}
	}
	secret := func() (client.Object, client.ObjectList) {
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: materialSecret}}, &corev1.SecretList{}
	}
	cm := func() (client.Object, client.ObjectList) {
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "sec-config"}}, &corev1.ConfigMapList{}
	}
	for _, who := range []struct {
		name string
		c    client.WithWatch
	}{{"unselected node-s3", s3}, {"the DaemonSet agent", ds}} {
		o, l := secret()
		forbidden(who.name+" on the Secret", reads(ctx, who.c, o, l))
		o, l = cm()
		forbidden(who.name+" on the ConfigMap", reads(ctx, who.c, o, l))
	}
	// A selected host may get its objects by name, and nothing more.
	o, l := secret()
	forbidden("node-s1 on the Secret", reads(ctx, s1, o, l), "get")
	o = &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "unrelated"}}
	forbidden("node-s1 on another Secret", reads(ctx, s1, o, &corev1.SecretList{}))
	if err := s1.Update(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: materialNS, Name: materialSecret}}); !apierrors.IsForbidden(err) {
		t.Errorf("node-s1 updates the Secret: want Forbidden, got %v", err)
	}

	// node-s2 leaves the selection: its instance is being removed (its agent still holds the
	// finalizer), and its access ends.
	var h v1.GatewayHost
	if err := admin.Get(ctx, client.ObjectKey{Name: "node-s2"}, &h); err != nil {
		t.Fatal(err)
	}
	h.Labels = map[string]string{"role": "plain"}
	if err := admin.Update(ctx, &h); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, "node-s2 to lose the Secret", 60*time.Second, func() (bool, string) {
		err := s2.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: materialSecret}, &corev1.Secret{})
		return apierrors.IsForbidden(err), fmt.Sprint(err)
	})
	o, l = secret()
	forbidden("node-s2 after leaving", reads(ctx, s2, o, l))
	o, l = cm()
	forbidden("node-s2 after leaving", reads(ctx, s2, o, l))
	if err := s1.Get(ctx, client.ObjectKey{Namespace: materialNS, Name: materialSecret}, &corev1.Secret{}); err != nil {
		t.Errorf("node-s1 lost the Secret when node-s2 left: %v", err)
	}
}

// releaseProfile deletes a profile and lets its instances go, as their agents would.
func releaseProfile(t *testing.T, name string) {
	ctx := context.Background()
	var list v1.GatewayInstanceList
	_ = admin.List(ctx, &list, client.MatchingLabels{v1.LabelProfile: name})
	for _, gi := range list.Items {
		setFinalizers(t, gi.Name)
		_ = admin.Delete(ctx, &gi)
	}
	if err := admin.Delete(ctx, named[v1.GatewayProfile](name)); client.IgnoreNotFound(err) != nil {
		t.Error(err)
	}
	var p v1.GatewayProfile
	if err := admin.Get(ctx, client.ObjectKey{Name: name}, &p); err == nil {
		p.Finalizers = nil
		_ = admin.Update(ctx, &p)
	}
}

// TestManagerGrantsOnlyAgentAccess: the controller manager may read every Secret of its
// namespace, and so RBAC lets it grant any of them to anyone; the admission policy lets it write
// only a Role gateway-agent-<host> allowing get on named Secrets or ConfigMaps, bound to that
// host's agent alone.
func TestManagerGrantsOnlyAgentAccess(t *testing.T) {
	toolRunSetUp(t)
	outer := t // objects live until the test ends: a binding needs its Role
	get := func(res string, names ...string) rbacv1.PolicyRule {
		return rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{res}, Verbs: []string{"get"}, ResourceNames: names}
	}
	role := func(name string, rules ...rbacv1.PolicyRule) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			r := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: materialNS}, Rules: rules}
			deleteLater(outer, r)
			return manager.Create(ctx, r)
		}
	}
	binding := func(name, role string, subjects ...rbacv1.Subject) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			b := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: materialNS},
				RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role}, Subjects: subjects}
			deleteLater(outer, b)
			return manager.Create(ctx, b)
		}
	}
	slots := func(names ...string) rbacv1.PolicyRule {
		return rbacv1.PolicyRule{APIGroups: []string{v1.GroupVersion.Group}, Resources: []string{"toolruns"},
			Verbs: []string{"get", "watch", "delete"}, ResourceNames: names}
	}
	user := func(n string) rbacv1.Subject {
		return rbacv1.Subject{APIGroup: rbacv1.GroupName, Kind: "User", Name: n}
	}
	waitForAccessPolicy(t)
	roleMsg := "a Role it writes allows only get, on Secrets or ConfigMaps it names"
	runSteps(t, []step{
		{"the grant the controller writes", role("gateway-agent-node-p1", get("secrets", "a", "b"), get("configmaps", "c")), verdict{}},
		{"its binding", binding("gateway-agent-node-p1", "gateway-agent-node-p1", user("system:gateway-agent:node-p1")), verdict{}},
		{"a Role of another name", role("reader", get("secrets", "a")), byAccessPolicy("its Roles and RoleBindings are named gateway-agent-<host>")},
		{"get on every Secret", role("gateway-agent-node-p2", get("secrets")), byAccessPolicy(roleMsg)},
		{"list Secrets", role("gateway-agent-node-p3", rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"},
			Verbs: []string{"list"}, ResourceNames: []string{"a"}}), byAccessPolicy(roleMsg)},
		{"get Pods", role("gateway-agent-node-p4", get("pods", "a")), byAccessPolicy(roleMsg)},
		{"ToolRun slots of its host", role("gateway-agent-node-p9", slots("core.node-p9.0", "api.node-p9.1")), verdict{}},
		{"a ToolRun slot of another host", role("gateway-agent-node-p10", slots("core.node-p9.0")), byAccessPolicy(roleMsg, "<profile>.node-p10.<k>")},
		{"a ToolRun that is not a slot", role("gateway-agent-node-p11", slots("core.node-p11")), byAccessPolicy(roleMsg)},
		{"every ToolRun", role("gateway-agent-node-p12", slots()), byAccessPolicy(roleMsg)},
		{"create ToolRuns", role("gateway-agent-node-p13", rbacv1.PolicyRule{APIGroups: []string{v1.GroupVersion.Group},
			Resources: []string{"toolruns"}, Verbs: []string{"create", "get", "watch", "delete"}, ResourceNames: []string{"core.node-p13.0"}}),
			byAccessPolicy(roleMsg)},
		// The manager holds neither escalate nor bind: RBAC refuses it what it does not hold.
		{"update a Secret", role("gateway-agent-node-p5", rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"},
			Verbs: []string{"get", "update"}, ResourceNames: []string{"a"}}), byEscalationCheck()},
		{"bind to the agents' group", binding("gateway-agent-node-p1", "gateway-agent-node-p1",
			rbacv1.Subject{APIGroup: rbacv1.GroupName, Kind: "Group", Name: agentGroup}), byAccessPolicy("alone")},
		{"another host's grant", role("gateway-agent-node-p6", get("secrets", "a")), verdict{}},
		{"bind to another host's agent", binding("gateway-agent-node-p6", "gateway-agent-node-p6", user("system:gateway-agent:node-p1")),
			byAccessPolicy("to the user system:gateway-agent:node-p6 alone")},
		{"bind a ClusterRole", func(t *testing.T, ctx context.Context) error {
			b := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "gateway-agent-node-p7", Namespace: materialNS},
				RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "gateway-operator-agent"},
				Subjects: []rbacv1.Subject{user("system:gateway-agent:node-p7")}}
			deleteLater(t, b)
			return manager.Create(ctx, b)
		}, byEscalationCheck()},
		{"a Role in another namespace", func(t *testing.T, ctx context.Context) error {
			r := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "gateway-agent-node-p8", Namespace: "default"}, Rules: []rbacv1.PolicyRule{get("secrets", "a")}}
			deleteLater(t, r)
			return manager.Create(ctx, r)
		}, byRBAC("create", "roles")},
		{"delete a Role of another name", func(_ *testing.T, ctx context.Context) error {
			return manager.Delete(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "gateway-operator-manager", Namespace: materialNS}})
		}, byAccessPolicy("its Roles and RoleBindings are named gateway-agent-<host>")},
	})
}

func byAccessPolicy(text ...string) verdict {
	return verdict{by: "policy", policy: accessPolicy, text: text}
}

// byEscalationCheck: RBAC refuses to let anyone grant what it does not hold itself.
func byEscalationCheck() verdict {
	return verdict{by: "rbac", text: []string{"attempting to grant RBAC permissions not currently held"}}
}

// waitForAccessPolicy waits until the API server enforces gateway-manager-agent-access.
func waitForAccessPolicy(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	poll.Until(t, accessPolicy+" to be enforced", 60*time.Second, func() (bool, string) {
		r := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: materialNS}}
		err := manager.Create(ctx, r)
		if err == nil {
			_ = admin.Delete(ctx, r)
		}
		return err != nil && strings.Contains(err.Error(), accessPolicy), fmt.Sprint(err)
	})
}
