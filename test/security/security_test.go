// Package security_test checks the node agents' security model against a real kube-apiserver:
// the RBAC of config/rbac/agent_role.yaml and the admission policy of
// config/policies/agent_policy.yaml, both applied from the files themselves, exercised by real
// client-certificate identities for two hosts; and that the controller manager, under its own
// role (config/rbac/role.yaml), can do what the agents may not.
package security_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/test/controlplane"
	"github.com/agent-gateway/gateway-operator/test/repo"
)

const (
	policyName = "gateway-agent-own-host"
	agentGroup = "system:gateway-agents"
	daemonSA   = "system:serviceaccount:gateway-operator-system:gateway-agent"
	sha        = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
)

var (
	cp    *controlplane.Env
	admin client.Client
	// Agents of hosts node-a and node-b, authenticated by client certificates.
	nodeA, nodeB client.Client
	nodeACfg     *rest.Config
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	var err error
	if cp, err = controlplane.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := cp.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "stop control plane:", err)
		}
	}()
	admin = cp.Client
	if err := setUp(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "set up:", err)
		return 1
	}
	return m.Run()
}

func setUp(ctx context.Context) error {
	// The operator's namespace holds the agents' Lease Role and their Leases, and the manager's Role
	// for profiles' material.
	if err := admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: v1.DefaultHostLeaseNamespace}}); err != nil {
		return err
	}
	for _, file := range []string{"config/rbac/agent_role.yaml", "config/policies/agent_policy.yaml",
		"config/rbac/role.yaml", "config/rbac/role_binding.yaml", "config/rbac/user_roles.yaml"} {
		if err := applyFile(ctx, file); err != nil {
			return err
		}
	}
	for _, h := range []string{"node-a", "node-b"} {
		if err := admin.Create(ctx, &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: h}}); err != nil {
			return err
		}
		if err := admin.Create(ctx, instance("core", h)); err != nil {
			return err
		}
	}
	var err error
	if nodeA, nodeACfg, err = newUser("system:gateway-agent:node-a", agentGroup); err != nil {
		return err
	}
	if nodeB, _, err = newUser("system:gateway-agent:node-b", agentGroup); err != nil {
		return err
	}
	return waitForPolicy(ctx)
}

// applyFile creates every object of a YAML file of the repository as the administrator.
func applyFile(ctx context.Context, rel string) error { return repo.Apply(ctx, admin, rel) }

// newUser provisions a client-certificate identity. Certificates carry a name and groups only,
// never userInfo.extra.
func newUser(name string, groups ...string) (client.Client, *rest.Config, error) {
	u, err := cp.AddUser(envtest.User{Name: name, Groups: groups}, nil)
	if err != nil {
		return nil, nil, err
	}
	c, err := client.New(u.Config(), client.Options{Scheme: cp.Scheme})
	return c, u.Config(), err
}

// waitForPolicy waits until the API server enforces the policy and its binding, which it loads
// asynchronously: until a no-op status patch by node-a on node-b's instance is refused by it.
func waitForPolicy(ctx context.Context) error {
	var err error
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		err = nodeA.Status().Patch(ctx, named[v1.GatewayInstance]("core.node-b"), mergePatch(`{}`))
		if apierrors.IsForbidden(err) && strings.Contains(err.Error(), policyName) {
			return nil
		}
	}
	return fmt.Errorf("within 60s, %s never refused node-a a status patch of core.node-b; last answer: %v", policyName, err)
}

// editHost reads a host with c and writes it back changed (an update, not a patch).
func editHost(ctx context.Context, c client.Client, name string, f func(*v1.GatewayHost)) error {
	var h v1.GatewayHost
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &h); err != nil {
		return err
	}
	f(&h)
	return c.Update(ctx, &h)
}

func instance(profile, host string) *v1.GatewayInstance {
	return &v1.GatewayInstance{
		ObjectMeta: metav1.ObjectMeta{
			Name:       profile + "." + host,
			Labels:     map[string]string{v1.LabelHost: host, v1.LabelProfile: profile},
			Finalizers: []string{v1.FinalizerInstanceUnits},
		},
		Spec: v1.GatewayInstanceSpec{
			Profile: profile, Host: host,
			Release: v1.ReleaseArtifact{Name: "r1", URL: "https://example.com/a.tgz", SHA256: sha, Label: "1.0.0"},
		},
	}
}

// named returns an empty cluster-scoped object with just a name, enough to patch or delete it.
func named[T any, P interface {
	*T
	client.Object
}](name string) P {
	o := P(new(T))
	o.SetName(name)
	return o
}

func mergePatch(body string) client.Patch { return client.RawPatch(types.MergePatchType, []byte(body)) }

// editInstance reads an instance as c, changes it with f and sends the difference as a merge
// patch as c, the way the agent itself writes.
func editInstance(ctx context.Context, c client.Client, name string, f func(*v1.GatewayInstance)) error {
	var gi v1.GatewayInstance
	if err := c.Get(ctx, client.ObjectKey{Name: name}, &gi); err != nil {
		return err
	}
	base := gi.DeepCopy()
	f(&gi)
	return c.Patch(ctx, &gi, client.MergeFrom(base))
}

func setFinalizers(t *testing.T, name string, finalizers ...string) {
	t.Helper()
	err := editInstance(context.Background(), admin, name, func(gi *v1.GatewayInstance) { gi.Finalizers = finalizers })
	if err != nil {
		t.Fatalf("reset finalizers of %s: %v", name, err)
	}
}

func event(name, kind, regarding string) *eventsv1.Event {
	return &eventsv1.Event{
		ObjectMeta:          metav1.ObjectMeta{Name: name, Namespace: "default"},
		EventTime:           metav1.NowMicro(),
		ReportingController: "gateway.agent.dev/agent",
		ReportingInstance:   "gateway-agent-node-a",
		Action:              "Apply",
		Reason:              "Restarted",
		Type:                corev1.EventTypeNormal,
		Note:                "restarted agent-gateway@core.service",
		Regarding:           corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: kind, Name: regarding},
	}
}

// deleteLater removes obj as admin when the test ends, should it exist.
func deleteLater(t *testing.T, obj client.Object) {
	t.Cleanup(func() {
		if err := admin.Delete(context.Background(), obj); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("clean up %s: %v", obj.GetName(), err)
		}
	})
}

// verdict is what a request must come to: allowed, or refused by the policy or by RBAC with a
// message containing every text.
type verdict struct {
	by   string
	text []string
	// policy is the admission policy that must refuse, policyName when empty.
	policy string
}

var allowed = verdict{}

func byPolicy(text ...string) verdict { return verdict{by: "policy", text: text} }

func byRBAC(verb, resource string) verdict {
	return verdict{by: "rbac", text: []string{fmt.Sprintf("cannot %s resource %q", verb, resource)}}
}

func (v verdict) check(t *testing.T, err error) {
	t.Helper()
	if v.by == "" {
		if err != nil {
			t.Fatalf("refused; want allowed: %v", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("allowed; want refused by %s (%s)", v.by, strings.Join(v.text, "; "))
	}
	if !apierrors.IsForbidden(err) {
		t.Fatalf("want Forbidden by %s, got %v", v.by, err)
	}
	policy := policyName
	if v.policy != "" {
		policy = v.policy
	}
	fromPolicy := strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+policy+"'")
	if v.by == "policy" && !fromPolicy {
		t.Errorf("refused, but not by %s: %v", policy, err)
	}
	if v.by == "rbac" && fromPolicy {
		t.Errorf("refused by the policy; want RBAC to refuse first: %v", err)
	}
	for _, want := range v.text {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal does not mention %q:\n%v", want, err)
		}
	}
	t.Logf("refused: %v", err)
}

type step struct {
	name string
	do   func(t *testing.T, ctx context.Context) error
	want verdict
}

func runSteps(t *testing.T, steps []step) {
	t.Helper()
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			s.want.check(t, s.do(t, ctx))
		})
	}
}

func TestInstanceStatus(t *testing.T) {
	patchStatus := func(c client.Client, name string) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			return c.Status().Patch(ctx, named[v1.GatewayInstance](name),
				mergePatch(fmt.Sprintf(`{"status":{"unit":"agent-gateway@core.service","mainPID":%d}}`, time.Now().UnixNano()%100000+1)))
		}
	}
	runSteps(t, []step{
		{"node-a patches status of core.node-a", patchStatus(nodeA, "core.node-a"), allowed},
		{"node-b patches status of core.node-b", patchStatus(nodeB, "core.node-b"), allowed},
		{"node-a patches status of core.node-b", patchStatus(nodeA, "core.node-b"), byPolicy(
			"gateway agent for host node-a may not modify status of GatewayInstance core.node-b: it belongs to host node-b")},
		{"node-b patches status of core.node-a", patchStatus(nodeB, "core.node-a"), byPolicy(
			"gateway agent for host node-b may not modify status of GatewayInstance core.node-a: it belongs to host node-a")},
		{"node-a replaces status of core.node-a (PUT)", func(_ *testing.T, ctx context.Context) error {
			var gi v1.GatewayInstance
			if err := nodeA.Get(ctx, client.ObjectKey{Name: "core.node-a"}, &gi); err != nil {
				return err
			}
			return nodeA.Status().Update(ctx, &gi)
		}, byRBAC("update", "gatewayinstances/status")},
	})
}

func TestInstanceFinalizer(t *testing.T) {
	removeUnits := func(c client.Client, name string) func(*testing.T, context.Context) error {
		return func(t *testing.T, ctx context.Context) error {
			err := editInstance(ctx, c, name, func(gi *v1.GatewayInstance) {
				gi.Finalizers = without(gi.Finalizers, v1.FinalizerInstanceUnits)
			})
			if err == nil {
				// Later cases need the instance as the controller manager left it.
				t.Cleanup(func() { setFinalizers(t, name, v1.FinalizerInstanceUnits) })
			}
			return err
		}
	}
	runSteps(t, []step{
		{"node-a removes the units finalizer from core.node-a", removeUnits(nodeA, "core.node-a"), allowed},
		{"node-a removes the units finalizer from core.node-b", removeUnits(nodeA, "core.node-b"), byPolicy(
			"gateway agent for host node-a may not modify GatewayInstance core.node-b: it belongs to host node-b")},
		{"node-a adds a finalizer to core.node-a", func(t *testing.T, ctx context.Context) error {
			err := editInstance(ctx, nodeA, "core.node-a", func(gi *v1.GatewayInstance) {
				gi.Finalizers = append(gi.Finalizers, "example.com/keep")
			})
			if err == nil {
				t.Cleanup(func() { setFinalizers(t, "core.node-a", v1.FinalizerInstanceUnits) })
			}
			return err
		}, byPolicy("may not modify GatewayInstance core.node-a",
			"an agent may only remove the gateway.agent.dev/units finalizer, not add example.com/keep")},
		{"node-a removes another controller's finalizer from core.node-a", func(t *testing.T, ctx context.Context) error {
			setFinalizers(t, "core.node-a", v1.FinalizerInstanceUnits, "example.com/audit")
			t.Cleanup(func() { setFinalizers(t, "core.node-a", v1.FinalizerInstanceUnits) })
			return editInstance(ctx, nodeA, "core.node-a", func(gi *v1.GatewayInstance) {
				gi.Finalizers = without(gi.Finalizers, "example.com/audit")
			})
		}, byPolicy("may not modify GatewayInstance core.node-a",
			"an agent may only remove the gateway.agent.dev/units finalizer, not example.com/audit")},
	})
	var gi v1.GatewayInstance
	if err := admin.Get(context.Background(), client.ObjectKey{Name: "core.node-a"}, &gi); err != nil {
		t.Fatal(err)
	}
	if len(gi.Finalizers) != 1 || gi.Finalizers[0] != v1.FinalizerInstanceUnits {
		t.Errorf("core.node-a's finalizers after the cases are %v; want only %s", gi.Finalizers, v1.FinalizerInstanceUnits)
	}
}

func without(list []string, drop string) []string {
	var out []string
	for _, s := range list {
		if s != drop {
			out = append(out, s)
		}
	}
	return out
}

func TestInstanceSpecAndMetadata(t *testing.T) {
	edit := func(f func(*v1.GatewayInstance)) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error { return editInstance(ctx, nodeA, "core.node-a", f) }
	}
	var host v1.GatewayHost
	if err := admin.Get(context.Background(), client.ObjectKey{Name: "node-a"}, &host); err != nil {
		t.Fatal(err)
	}
	spec := "gateway agent for host node-a may not modify GatewayInstance core.node-a: its spec is written by the controller manager"
	meta := "gateway agent for host node-a may not modify GatewayInstance core.node-a: its labels, annotations and ownerReferences are written by the controller manager"
	runSteps(t, []step{
		{"node-a changes spec.release.label", edit(func(gi *v1.GatewayInstance) { gi.Spec.Release.Label = "9.9.9" }), byPolicy(spec)},
		{"node-a changes spec.configHash", edit(func(gi *v1.GatewayInstance) { gi.Spec.ConfigHash = "forged" }), byPolicy(spec)},
		{"node-a changes a label", edit(func(gi *v1.GatewayInstance) { gi.Labels[v1.LabelHost] = "node-b" }), byPolicy(meta)},
		{"node-a adds a label", edit(func(gi *v1.GatewayInstance) { gi.Labels["extra"] = "x" }), byPolicy(meta)},
		{"node-a adds an annotation", edit(func(gi *v1.GatewayInstance) { gi.Annotations = map[string]string{"a": "b"} }), byPolicy(meta)},
		{"node-a adds an ownerReference", edit(func(gi *v1.GatewayInstance) {
			gi.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1.GroupVersion.String(), Kind: "GatewayHost", Name: host.Name, UID: host.UID}}
		}), byPolicy(meta)},
		{"node-a creates a GatewayInstance", func(t *testing.T, ctx context.Context) error {
			gi := instance("extra", "node-a")
			gi.Finalizers = nil // so a wrongly allowed create is cleaned up completely
			deleteLater(t, gi)
			return nodeA.Create(ctx, gi)
		}, byRBAC("create", "gatewayinstances")},
		{"node-a deletes core.node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, named[v1.GatewayInstance]("core.node-a"))
		}, byRBAC("delete", "gatewayinstances")},
	})
}

func TestHost(t *testing.T) {
	heartbeat := func(c client.Client, name string) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			return c.Status().Patch(ctx, named[v1.GatewayHost](name),
				mergePatch(fmt.Sprintf(`{"status":{"agentVersion":"test","lastHeartbeatTime":%q}}`, time.Now().UTC().Format(time.RFC3339))))
		}
	}
	runSteps(t, []step{
		{"node-a patches status of GatewayHost node-a", heartbeat(nodeA, "node-a"), allowed},
		{"node-a patches status of GatewayHost node-b", heartbeat(nodeA, "node-b"), byPolicy(
			"gateway agent for host node-a may not modify status of GatewayHost node-b: it is not this agent's host")},
		{"node-a creates GatewayHost node-c", func(t *testing.T, ctx context.Context) error {
			h := named[v1.GatewayHost]("node-c")
			deleteLater(t, h)
			return nodeA.Create(ctx, h)
		}, byPolicy("gateway agent for host node-a may not create GatewayHost node-c: it is not this agent's host")},
		{"node-a deletes GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, named[v1.GatewayHost]("node-a"))
		}, byRBAC("delete", "gatewayhosts")},
		{"node-a labels GatewayHost node-a with an administrator's label", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"labels":{"tier":"gold"}}}`))
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-a: label tier is an administrator's")},
		{"node-a removes an administrator's label of GatewayHost node-a", func(t *testing.T, ctx context.Context) error {
			if err := admin.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"labels":{"role":"prod"}}}`)); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = admin.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"labels":{"role":null}}}`))
			})
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"labels":{"role":null}}}`))
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-a: label role is an administrator's")},
		{"node-a reports a fact label on GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"labels":{"reported.gateway.agent.dev/kvm":"true"}}}`))
		}, allowed},
		{"node-a reports a fact label on GatewayHost node-b", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-b"), mergePatch(`{"metadata":{"labels":{"reported.gateway.agent.dev/kvm":"true"}}}`))
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-b: it is not this agent's host")},
		{"node-a cordons nothing: spec of GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"spec":{"unschedulable":true}}`))
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-a: its spec, annotations, finalizers and ownerReferences are an administrator's")},
		{"node-a annotates GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"metadata":{"annotations":{"x":"y"}}}`))
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-a: its spec, annotations, finalizers and ownerReferences are an administrator's")},
		{"node-a gets GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Get(ctx, client.ObjectKey{Name: "node-a"}, &v1.GatewayHost{})
		}, allowed},
	})
}

// TestHostRegistration: an agent registers its own host on first start, with the labels it
// reports and no other: it cannot choose the labels profiles select on (role: prod) and so
// attract their instances.
// lease is a host's heartbeat Lease as its agent writes it.
func lease(host string) *coordinationv1.Lease {
	now, id := metav1.NewMicroTime(time.Now()), "agent-"+host
	return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: v1.DefaultHostLeaseNamespace, Name: host},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &id, RenewTime: &now}}
}

// TestLease: an agent creates and renews its own host's heartbeat Lease, and no other: node-a
// cannot renew node-b's Lease, nor create one for another host, nor delete its own.
func TestLease(t *testing.T) {
	renew := func(c client.Client, host string) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			var l coordinationv1.Lease
			if err := c.Get(ctx, client.ObjectKey{Namespace: v1.DefaultHostLeaseNamespace, Name: host}, &l); err != nil {
				return err
			}
			now := metav1.NewMicroTime(time.Now())
			l.Spec.RenewTime = &now
			return c.Update(ctx, &l)
		}
	}
	outer := t // Leases created here live until the whole test ends
	create := func(c client.Client, host string) func(*testing.T, context.Context) error {
		return func(_ *testing.T, ctx context.Context) error {
			l := lease(host)
			deleteLater(outer, l)
			return c.Create(ctx, l)
		}
	}
	runSteps(t, []step{
		{"node-a creates its Lease", create(nodeA, "node-a"), allowed},
		{"node-a renews its Lease", renew(nodeA, "node-a"), allowed},
		{"node-b creates its Lease", create(nodeB, "node-b"), allowed},
		{"node-a renews node-b's Lease", renew(nodeA, "node-b"), byPolicy(
			"gateway agent for host node-a may not modify Lease gateway-operator-system/node-b: an agent may only create and renew the Lease gateway-operator-system/node-a")},
		{"node-a creates a Lease for node-c", create(nodeA, "node-c"), byPolicy(
			"gateway agent for host node-a may not create Lease gateway-operator-system/node-c")},
		{"node-a deletes its Lease", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, lease("node-a"))
		}, byRBAC("delete", "leases")},
		{"node-a creates a Lease in another namespace", func(t *testing.T, ctx context.Context) error {
			l := lease("node-a")
			l.Namespace = "default"
			deleteLater(t, l)
			return nodeA.Create(ctx, l)
		}, byRBAC("create", "leases")},
		{"node-a renews the manager's leader Lease", func(t *testing.T, ctx context.Context) error {
			l := lease("gateway-operator.gateway.agent.dev")
			l.Spec.HolderIdentity = ptrTo("manager-1")
			if err := admin.Create(ctx, l); err != nil {
				t.Fatal(err)
			}
			deleteLater(t, l)
			return renew(nodeA, l.Name)(t, ctx)
		}, byPolicy("gateway agent for host node-a may not modify Lease gateway-operator-system/gateway-operator.gateway.agent.dev")},
	})
}

func TestHostRegistration(t *testing.T) {
	nodeD, _, err := newUser("system:gateway-agent:node-d", agentGroup)
	if err != nil {
		t.Fatal(err)
	}
	register := func(labels map[string]string, annotations map[string]string) func(*testing.T, context.Context) error {
		return func(t *testing.T, ctx context.Context) error {
			h := &v1.GatewayHost{ObjectMeta: metav1.ObjectMeta{Name: "node-d", Labels: labels, Annotations: annotations}}
			deleteLater(t, h)
			err := nodeD.Create(ctx, h)
			if err == nil {
				if err := admin.Delete(ctx, h); err != nil {
					t.Fatal(err)
				}
			}
			return err
		}
	}
	runSteps(t, []step{
		{"node-d registers with an administrator's label", register(map[string]string{v1.LabelReportedArch: "amd64", "role": "prod"}, nil),
			byPolicy("gateway agent for host node-d may not create GatewayHost node-d: label role is an administrator's")},
		{"node-d registers with an annotation", register(nil, map[string]string{"x": "y"}),
			byPolicy("gateway agent for host node-d may not create GatewayHost node-d: its spec, annotations")},
		{"node-d registers with reported labels", register(map[string]string{v1.LabelReportedArch: "amd64", v1.LabelReportedKVM: "false"}, nil), allowed},
	})
}

func TestOtherKindsAreRBACDenied(t *testing.T) {
	create := func(obj client.Object) func(*testing.T, context.Context) error {
		return func(t *testing.T, ctx context.Context) error {
			deleteLater(t, obj)
			return nodeA.Create(ctx, obj)
		}
	}
	runSteps(t, []step{
		{"GatewayProfile", create(&v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "evil"},
			Spec: v1.GatewayProfileSpec{Release: "r1"}}), byRBAC("create", "gatewayprofiles")},
		{"Release", create(&v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "evil"},
			Spec: v1.ReleaseSpec{Source: v1.ReleaseSource{URL: "https://example.com/a.tar.gz"}, SHA256: sha, Label: "1.0.0"}}),
			byRBAC("create", "releases")},
		{"ConfigMap", create(&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "evil", Namespace: "default"}}),
			byRBAC("create", "configmaps")},
		{"Pod", create(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "evil", Namespace: "default"},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "x", Image: "example.com/x"}}}}),
			byRBAC("create", "pods")},
		{"core Event", create(&corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "evil", Namespace: "default"},
			InvolvedObject: corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "GatewayInstance", Name: "core.node-a"},
			Reason:         "Restarted", Type: corev1.EventTypeNormal}),
			byRBAC("create", "events")},
		{"list Releases", func(_ *testing.T, ctx context.Context) error {
			return nodeA.List(ctx, &v1.ReleaseList{})
		}, byRBAC("list", "releases")},
	})
}

func TestEvents(t *testing.T) {
	create := func(ev *eventsv1.Event) func(*testing.T, context.Context) error {
		return func(t *testing.T, ctx context.Context) error {
			deleteLater(t, ev)
			return nodeA.Create(ctx, ev)
		}
	}
	runSteps(t, []step{
		{"regarding GatewayInstance core.node-a", create(event("core.node-a.1", "GatewayInstance", "core.node-a")), allowed},
		{"regarding GatewayHost node-a", create(event("node-a.1", "GatewayHost", "node-a")), allowed},
		{"regarding GatewayInstance core.node-b", create(event("core.node-b.1", "GatewayInstance", "core.node-b")), byPolicy(
			"gateway agent for host node-a may not create Event default/core.node-b.1: it regards GatewayInstance core.node-b")},
		{"regarding GatewayHost node-b", create(event("node-b.1", "GatewayHost", "node-b")), byPolicy(
			"may not create Event default/node-b.1: it regards GatewayHost node-b")},
		// The name alone is not enough: the event must be about this project's kinds.
		{"regarding a Pod named like an instance", create(func() *eventsv1.Event {
			ev := event("pod.1", "Pod", "web.node-a")
			ev.Regarding.APIVersion, ev.Regarding.Namespace = "v1", "default"
			return ev
		}()), byPolicy("may not create Event default/pod.1: it regards Pod web.node-a")},
		{"regarding a GatewayProfile named like an instance", create(event("profile.1", "GatewayProfile", "core.node-a")),
			byPolicy("may not create Event default/profile.1: it regards GatewayProfile core.node-a")},
		{"patch of its own event", func(t *testing.T, ctx context.Context) error {
			ev := event("core.node-a.2", "GatewayInstance", "core.node-a")
			if err := admin.Create(ctx, ev); err != nil {
				t.Fatal(err)
			}
			deleteLater(t, ev)
			return nodeA.Patch(ctx, ev, mergePatch(`{"metadata":{"labels":{"seen":"twice"}}}`))
		}, allowed},
		{"patch of another host's event", func(t *testing.T, ctx context.Context) error {
			ev := event("core.node-b.2", "GatewayInstance", "core.node-b")
			if err := admin.Create(ctx, ev); err != nil {
				t.Fatal(err)
			}
			deleteLater(t, ev)
			return nodeA.Patch(ctx, ev, mergePatch(`{"metadata":{"labels":{"seen":"twice"}}}`))
		}, byPolicy("may not modify Event default/core.node-b.2: it regards GatewayInstance core.node-b")},
	})
}

func TestReads(t *testing.T) {
	ctx := context.Background()
	var list v1.GatewayInstanceList
	if err := nodeA.List(ctx, &list, client.MatchingLabels{v1.LabelHost: "node-a"}); err != nil {
		t.Fatalf("node-a lists its GatewayInstances: %v", err)
	}
	if len(list.Items) != 1 || list.Items[0].Name != "core.node-a" {
		t.Errorf("node-a's GatewayInstances: got %d items, want core.node-a alone", len(list.Items))
	}
	// The agent's cache watches its instances by label.
	wc, err := client.NewWithWatch(nodeACfg, client.Options{Scheme: cp.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	w, err := wc.Watch(ctx, &v1.GatewayInstanceList{}, client.MatchingLabels{v1.LabelHost: "node-a"})
	if err != nil {
		t.Fatalf("node-a watches its GatewayInstances: %v", err)
	}
	defer w.Stop()
	select {
	case ev := <-w.ResultChan():
		if gi, ok := ev.Object.(*v1.GatewayInstance); !ok || gi.Name != "core.node-a" {
			t.Errorf("first watch event: %s %T, want core.node-a", ev.Type, ev.Object)
		}
	case <-time.After(10 * time.Second):
		t.Error("no watch event within 10s")
	}
	if err := nodeA.List(ctx, &v1.GatewayHostList{}); err != nil {
		t.Errorf("node-a lists GatewayHosts: %v", err)
	}
}

// TestAdminIsNotPoliced: the policy matches agents only; the default envtest client is an
// administrator (group system:masters).
func TestAdminIsNotPoliced(t *testing.T) {
	runSteps(t, []step{
		{"patch status of core.node-b", func(_ *testing.T, ctx context.Context) error {
			return admin.Status().Patch(ctx, named[v1.GatewayInstance]("core.node-b"), mergePatch(`{"status":{"unit":"by-admin"}}`))
		}, allowed},
		{"change spec and labels of core.node-b", func(t *testing.T, ctx context.Context) error {
			t.Cleanup(func() {
				_ = editInstance(context.Background(), admin, "core.node-b", func(gi *v1.GatewayInstance) {
					gi.Spec.Release.Label = "1.0.0"
					delete(gi.Labels, "extra")
				})
			})
			return editInstance(ctx, admin, "core.node-b", func(gi *v1.GatewayInstance) {
				gi.Spec.Release.Label = "2.0.0"
				gi.Labels["extra"] = "x"
			})
		}, allowed},
		{"add a finalizer to core.node-b", func(t *testing.T, ctx context.Context) error {
			t.Cleanup(func() { setFinalizers(t, "core.node-b", v1.FinalizerInstanceUnits) })
			return editInstance(ctx, admin, "core.node-b", func(gi *v1.GatewayInstance) {
				gi.Finalizers = append(gi.Finalizers, "example.com/keep")
			})
		}, allowed},
		{"create and delete a GatewayInstance", func(_ *testing.T, ctx context.Context) error {
			gi := instance("extra", "node-b")
			gi.Finalizers = nil
			if err := admin.Create(ctx, gi); err != nil {
				return err
			}
			return admin.Delete(ctx, gi)
		}, allowed},
		{"create and delete a GatewayHost", func(_ *testing.T, ctx context.Context) error {
			h := named[v1.GatewayHost]("node-c")
			if err := admin.Create(ctx, h); err != nil {
				return err
			}
			return admin.Delete(ctx, h)
		}, allowed},
		{"create an event regarding core.node-b", func(t *testing.T, ctx context.Context) error {
			ev := event("admin.1", "GatewayInstance", "core.node-b")
			deleteLater(t, ev)
			return admin.Create(ctx, ev)
		}, allowed},
	})
}

// TestPolicyHoldsWhenRBACIsWider grants node-a more than its role, so that requests RBAC would
// refuse reach the policy, which must refuse them itself.
func TestPolicyHoldsWhenRBACIsWider(t *testing.T) {
	ctx := context.Background()
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: "test-agent-widened"},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{v1.GroupVersion.Group}, Resources: []string{"gatewayinstances", "gatewayhosts"}, Verbs: []string{"create", "delete", "update"}},
			{APIGroups: []string{v1.GroupVersion.Group}, Resources: []string{"releases", "gatewayprofiles", "gatewayprofiles/status", "toolruns"},
				Verbs: []string{"create", "update", "patch", "delete"}},
			{APIGroups: []string{""}, Resources: []string{"events", "configmaps", "secrets", "pods"}, Verbs: []string{"create", "patch", "delete"}},
			{APIGroups: []string{coordinationv1.GroupName}, Resources: []string{"leases"}, Verbs: []string{"create", "update", "delete"}},
		},
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "test-agent-widened"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: "system:gateway-agent:node-a"}},
	}
	for _, o := range []client.Object{role, binding} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	// A disposable instance without finalizers, so a wrongly allowed delete leaves nothing behind.
	spare := instance("spare", "node-a")
	spare.Finalizers = nil
	if err := admin.Create(ctx, spare); err != nil {
		t.Fatal(err)
	}
	deleteLater(t, spare)

	// RBAC changes reach the authorizer asynchronously: wait until the create gets past RBAC.
	extra := instance("extra", "node-a")
	extra.Finalizers = nil
	deleteLater(t, extra)
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		err = nodeA.Create(ctx, extra.DeepCopy())
		if err == nil || !strings.Contains(err.Error(), "cannot create resource") {
			break
		}
	}
	t.Run("node-a creates GatewayInstance extra.node-a", func(t *testing.T) {
		byPolicy("gateway agent for host node-a may not create GatewayInstance extra.node-a: GatewayInstances are created and deleted by the controller manager only").check(t, err)
	})
	rel := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "wide-r1"},
		Spec: v1.ReleaseSpec{Source: v1.ReleaseSource{URL: "https://example.com/a.tar.gz"}, SHA256: sha, Label: "1.0.0"}}
	prof := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "wide"}, Spec: v1.GatewayProfileSpec{Release: "wide-r1"}}
	for _, o := range []client.Object{rel, prof} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	other := func(what string) verdict {
		return byPolicy("gateway agent for host node-a may not " + what +
			": an agent writes only its own GatewayHost and heartbeat Lease, its GatewayInstances' status and finalizer, events about them, and its ToolRun slots")
	}
	runSteps(t, []step{
		{"node-a labels a Release", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.Release]("wide-r1"), mergePatch(`{"metadata":{"labels":{"x":"y"}}}`))
		}, other("update gateway.agent.dev/releases")},
		{"node-a creates a Release", func(t *testing.T, ctx context.Context) error {
			r := rel.DeepCopy()
			r.ResourceVersion, r.Name = "", "wide-r2"
			deleteLater(t, r)
			return nodeA.Create(ctx, r)
		}, other("create gateway.agent.dev/releases")},
		{"node-a moves a GatewayProfile to another release", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayProfile]("wide"), mergePatch(`{"spec":{"release":"wide-r2"}}`))
		}, other("update gateway.agent.dev/gatewayprofiles")},
		{"node-a promotes a GatewayProfile", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Patch(ctx, named[v1.GatewayProfile]("wide"), mergePatch(`{"metadata":{"annotations":{"gateway.agent.dev/promote":"1"}}}`))
		}, other("update gateway.agent.dev/gatewayprofiles")},
		{"node-a writes a GatewayProfile's status", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Status().Patch(ctx, named[v1.GatewayProfile]("wide"), mergePatch(`{"status":{"desired":3}}`))
		}, other("update gateway.agent.dev/gatewayprofiles/status")},
		{"node-a deletes a GatewayProfile", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, named[v1.GatewayProfile]("wide"))
		}, other("delete gateway.agent.dev/gatewayprofiles")},
		{"node-a creates a Secret", func(t *testing.T, ctx context.Context) error {
			sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "wide", Namespace: "default"}}
			deleteLater(t, sec)
			return nodeA.Create(ctx, sec)
		}, other("create secrets")},
		{"node-a creates a Pod", func(t *testing.T, ctx context.Context) error {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "wide", Namespace: "default"},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "x", Image: "example.com/x"}}}}
			deleteLater(t, pod)
			return nodeA.Create(ctx, pod)
		}, other("create pods")},
		{"node-a cordons its own host by update", func(_ *testing.T, ctx context.Context) error {
			return editHost(ctx, nodeA, "node-a", func(h *v1.GatewayHost) { h.Spec.Unschedulable = true })
		}, byPolicy("gateway agent for host node-a may not modify GatewayHost node-a: its spec")},
		{"node-a deletes its own GatewayInstance", func(_ *testing.T, ctx context.Context) error {
			return nodeA.Delete(ctx, named[v1.GatewayInstance]("spare.node-a"))
		}, byPolicy("gateway agent for host node-a may not delete GatewayInstance spare.node-a: GatewayInstances are created and deleted by the controller manager only")},
		{"node-a deletes GatewayHost node-a", func(t *testing.T, ctx context.Context) error {
			err := nodeA.Delete(ctx, named[v1.GatewayHost]("node-a"))
			if err == nil { // put it back for the other tests
				if err := admin.Create(ctx, named[v1.GatewayHost]("node-a")); err != nil {
					t.Errorf("recreate GatewayHost node-a: %v", err)
				}
			}
			return err
		}, byPolicy("gateway agent for host node-a may not delete GatewayHost node-a: GatewayHosts are removed by an administrator, never by an agent")},
		{"node-a deletes its own Lease", func(t *testing.T, ctx context.Context) error {
			l := lease("node-a")
			if err := admin.Create(ctx, l); err != nil && !apierrors.IsAlreadyExists(err) {
				t.Fatal(err)
			}
			deleteLater(t, l)
			return nodeA.Delete(ctx, lease("node-a"))
		}, byPolicy("gateway agent for host node-a may not delete Lease gateway-operator-system/node-a: an agent renews the heartbeat Lease of its host, never deletes it")},
		{"node-a creates a Lease named for it in another namespace", func(t *testing.T, ctx context.Context) error {
			l := lease("node-a")
			l.Namespace = "default"
			deleteLater(t, l)
			return nodeA.Create(ctx, l)
		}, byPolicy("gateway agent for host node-a may not create Lease default/node-a: an agent may only create and renew the Lease gateway-operator-system/node-a")},
		{"node-a creates a core Event regarding core.node-a", func(t *testing.T, ctx context.Context) error {
			ev := &corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "core-api.1", Namespace: "default"},
				InvolvedObject: corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "GatewayInstance", Name: "core.node-a"},
				Reason:         "Restarted", Type: corev1.EventTypeNormal}
			deleteLater(t, ev)
			return nodeA.Create(ctx, ev)
		}, allowed},
		{"node-a creates a core Event regarding core.node-b", func(t *testing.T, ctx context.Context) error {
			ev := &corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "core-api.2", Namespace: "default"},
				InvolvedObject: corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "GatewayInstance", Name: "core.node-b"},
				Reason:         "Restarted", Type: corev1.EventTypeNormal}
			deleteLater(t, ev)
			return nodeA.Create(ctx, ev)
		}, byPolicy("may not create Event default/core-api.2: it regards GatewayInstance core.node-b")},
		// The core API lets an update change involvedObject: the stored event counts too.
		{"node-a moves a core Event about core.node-b onto core.node-a", func(t *testing.T, ctx context.Context) error {
			ev := &corev1.Event{ObjectMeta: metav1.ObjectMeta{Name: "core-api.3", Namespace: "default"},
				InvolvedObject: corev1.ObjectReference{APIVersion: v1.GroupVersion.String(), Kind: "GatewayInstance", Name: "core.node-b"},
				Reason:         "Restarted", Type: corev1.EventTypeNormal}
			if err := admin.Create(ctx, ev); err != nil {
				t.Fatal(err)
			}
			deleteLater(t, ev)
			return nodeA.Patch(ctx, ev, mergePatch(`{"involvedObject":{"name":"core.node-a"}}`))
		}, byPolicy("may not modify Event default/core-api.3: it regards GatewayInstance core.node-b")},
	})
}

// TestIdentitiesWithoutHost: identities the policy matches but that name no host may write
// nothing. A client certificate for the DaemonSet's service-account user name carries no
// userInfo.extra, so it has no node name, exactly like a service-account token not bound to a
// pod. The allowed service-account path (a bound token whose extra names the node) cannot be
// exercised here: envtest has no way to issue tokens with extra fields.
func TestIdentitiesWithoutHost(t *testing.T) {
	sa, _, err := newUser(daemonSA, "system:serviceaccounts", "system:serviceaccounts:gateway-operator-system")
	if err != nil {
		t.Fatal(err)
	}
	stray, _, err := newUser("mallory", agentGroup)
	if err != nil {
		t.Fatal(err)
	}
	noHost := "the identity names no host"
	for _, id := range []struct {
		name string
		c    client.Client
	}{{daemonSA, sa}, {"mallory", stray}} {
		c, who := id.c, "gateway agent "+id.name
		t.Run(id.name, func(t *testing.T) {
			runSteps(t, []step{
				// The RBAC binding does apply to it: the refusals below come from the policy.
				{"lists GatewayInstances", func(_ *testing.T, ctx context.Context) error {
					return c.List(ctx, &v1.GatewayInstanceList{})
				}, allowed},
				{"patches status of core.node-a", func(_ *testing.T, ctx context.Context) error {
					return c.Status().Patch(ctx, named[v1.GatewayInstance]("core.node-a"), mergePatch(`{"status":{"unit":"x"}}`))
				}, byPolicy(who + " may not modify status of GatewayInstance core.node-a: " + noHost)},
				{"removes the finalizer of core.node-a", func(t *testing.T, ctx context.Context) error {
					err := editInstance(ctx, c, "core.node-a", func(gi *v1.GatewayInstance) { gi.Finalizers = nil })
					if err == nil {
						t.Cleanup(func() { setFinalizers(t, "core.node-a", v1.FinalizerInstanceUnits) })
					}
					return err
				}, byPolicy(who + " may not modify GatewayInstance core.node-a: " + noHost)},
				{"patches status of GatewayHost node-a", func(_ *testing.T, ctx context.Context) error {
					return c.Status().Patch(ctx, named[v1.GatewayHost]("node-a"), mergePatch(`{"status":{"agentVersion":"x"}}`))
				}, byPolicy(who + " may not modify status of GatewayHost node-a: " + noHost)},
				{"creates GatewayHost node-z", func(t *testing.T, ctx context.Context) error {
					h := named[v1.GatewayHost]("node-z")
					deleteLater(t, h)
					return c.Create(ctx, h)
				}, byPolicy(who + " may not create GatewayHost node-z: " + noHost)},
				{"creates an event regarding core.node-a", func(t *testing.T, ctx context.Context) error {
					ev := event("nohost.1", "GatewayInstance", "core.node-a")
					deleteLater(t, ev)
					return c.Create(ctx, ev)
				}, byPolicy(who + " may not create Event default/nohost.1: " + noHost)},
			})
		})
	}
}

// person provisions a client-certificate identity for a person bound to a ClusterRole, and waits
// until the authorizer knows the binding.
func person(t *testing.T, name, role string) client.Client {
	t.Helper()
	ctx := context.Background()
	b := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "test-" + name},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects: []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: name}}}
	if err := admin.Create(ctx, b); err != nil {
		t.Fatal(err)
	}
	deleteLater(t, b)
	c, _, err := newUser(name)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if err = c.List(ctx, &v1.GatewayProfileList{}); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("%s cannot list profiles with role %s: %v", name, role, err)
	}
	return c
}

// TestPeopleRoles: the viewer reads every kind and writes none; the operator runs rollouts
// (promote, roll back, pause, cordon) and cannot create or change Releases.
func TestPeopleRoles(t *testing.T) {
	ctx := context.Background()
	rel := &v1.Release{ObjectMeta: metav1.ObjectMeta{Name: "people-r1"},
		Spec: v1.ReleaseSpec{Source: v1.ReleaseSource{URL: "https://example.com/a.tar.gz"}, SHA256: sha, Label: "1.0.0"}}
	rel2 := rel.DeepCopy()
	rel2.Name = "people-r2"
	prof := &v1.GatewayProfile{ObjectMeta: metav1.ObjectMeta{Name: "people"}, Spec: v1.GatewayProfileSpec{Release: "people-r2"}}
	for _, o := range []client.Object{rel, rel2, prof} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		deleteLater(t, o)
	}
	viewer := person(t, "vera", "gateway-operator-viewer")
	operator := person(t, "otto", "gateway-operator-operator")
	lists := []client.ObjectList{&v1.GatewayHostList{}, &v1.GatewayInstanceList{}, &v1.GatewayProfileList{}, &v1.ReleaseList{}, &v1.ToolRunList{}}
	var steps []step
	for _, who := range []struct {
		name string
		c    client.Client
	}{{"vera", viewer}, {"otto", operator}} {
		for _, l := range lists {
			steps = append(steps, step{fmt.Sprintf("%s lists %T", who.name, l), func(_ *testing.T, ctx context.Context) error {
				return who.c.List(ctx, l)
			}, allowed})
		}
	}
	steps = append(steps,
		step{"vera promotes", func(_ *testing.T, ctx context.Context) error {
			return viewer.Patch(ctx, named[v1.GatewayProfile]("people"), mergePatch(`{"metadata":{"annotations":{"gateway.agent.dev/promote":"1"}}}`))
		}, byRBAC("patch", "gatewayprofiles")},
		step{"vera cordons", func(_ *testing.T, ctx context.Context) error {
			return viewer.Patch(ctx, named[v1.GatewayHost]("node-b"), mergePatch(`{"spec":{"unschedulable":true}}`))
		}, byRBAC("patch", "gatewayhosts")},
		step{"otto promotes", func(_ *testing.T, ctx context.Context) error {
			return operator.Patch(ctx, named[v1.GatewayProfile]("people"), mergePatch(`{"metadata":{"annotations":{"gateway.agent.dev/promote":"1"}}}`))
		}, allowed},
		step{"otto aborts", func(_ *testing.T, ctx context.Context) error {
			return operator.Patch(ctx, named[v1.GatewayProfile]("people"), mergePatch(`{"metadata":{"annotations":{"gateway.agent.dev/abort":"1"}}}`))
		}, allowed},
		step{"otto rolls back", func(_ *testing.T, ctx context.Context) error {
			return operator.Patch(ctx, named[v1.GatewayProfile]("people"), mergePatch(`{"spec":{"release":"people-r1"}}`))
		}, allowed},
		step{"otto pauses", func(_ *testing.T, ctx context.Context) error {
			return operator.Patch(ctx, named[v1.GatewayProfile]("people"), mergePatch(`{"spec":{"rollout":{"paused":true}}}`))
		}, allowed},
		step{"otto cordons a host", func(t *testing.T, ctx context.Context) error {
			t.Cleanup(func() {
				_ = admin.Patch(ctx, named[v1.GatewayHost]("node-b"), mergePatch(`{"spec":{"unschedulable":null}}`))
			})
			return operator.Patch(ctx, named[v1.GatewayHost]("node-b"), mergePatch(`{"spec":{"unschedulable":true}}`))
		}, allowed},
		step{"otto creates a Release", func(t *testing.T, ctx context.Context) error {
			r := rel.DeepCopy()
			r.ResourceVersion, r.Name = "", "people-r3"
			deleteLater(t, r)
			return operator.Create(ctx, r)
		}, byRBAC("create", "releases")},
		step{"otto labels a Release", func(_ *testing.T, ctx context.Context) error {
			return operator.Patch(ctx, named[v1.Release]("people-r1"), mergePatch(`{"metadata":{"labels":{"x":"y"}}}`))
		}, byRBAC("patch", "releases")},
		step{"otto deletes a Release", func(_ *testing.T, ctx context.Context) error {
			return operator.Delete(ctx, named[v1.Release]("people-r1"))
		}, byRBAC("delete", "releases")},
		step{"otto deletes the profile", func(_ *testing.T, ctx context.Context) error {
			return operator.Delete(ctx, named[v1.GatewayProfile]("people"))
		}, byRBAC("delete", "gatewayprofiles")},
		step{"otto writes an instance's status", func(_ *testing.T, ctx context.Context) error {
			return operator.Status().Patch(ctx, named[v1.GatewayInstance]("core.node-a"), mergePatch(`{"status":{"unit":"x"}}`))
		}, byRBAC("patch", "gatewayinstances/status")},
	)
	runSteps(t, steps)

	// The viewer role joins the built-in view role (the aggregation itself is done by
	// kube-controller-manager, which does not run here).
	var cr rbacv1.ClusterRole
	if err := admin.Get(ctx, client.ObjectKey{Name: "gateway-operator-viewer"}, &cr); err != nil {
		t.Fatal(err)
	}
	if cr.Labels["rbac.authorization.k8s.io/aggregate-to-view"] != "true" {
		t.Errorf("the viewer role is not aggregated to view: %v", cr.Labels)
	}
}
