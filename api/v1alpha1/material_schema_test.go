package v1alpha1_test

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func ptr32(v int32) *int32 { return &v }

// TestMaterialValidation: the schema refuses references that would leave home, open files to
// others, collide with the agent's names, or name both sources.
func TestMaterialValidation(t *testing.T) {
	key := &v1.KeySelector{Name: "creds", Key: "token"}
	p := func(name string, mut func(*v1.GatewayProfileSpec)) *v1.GatewayProfile {
		g := profile(name)
		mut(&g.Spec)
		return g
	}
	file := func(path string, mode *int32) func(*v1.GatewayProfileSpec) {
		return func(s *v1.GatewayProfileSpec) {
			s.Files = []v1.FileSource{{Path: path, Mode: mode, SecretKeyRef: key}}
		}
	}
	for _, tc := range []struct {
		name string
		mut  func(*v1.GatewayProfileSpec)
		want string
	}{
		{"m1", file("../etc/passwd", nil), "stay inside home"},
		{"m2", file("/etc/passwd", nil), "spec.files[0].path"},
		{"m3", file("config/../../x", nil), "stay inside home"},
		{"m4", file("config//x", nil), "stay inside home"},
		{"m5", file("config/", nil), "stay inside home"},
		{"m6", file("run/status.sock", nil), "run/"},
		{"m7", file("run", nil), "run/"},
		{"m8", file(".env", ptr32(0o622)), "must not let group or others write"},
		{"m9", file(".env", ptr32(0o606)), "must not let group or others write"},
		{"m10", file(".env", ptr32(0o200)), "owner read"},
		{"m11", file(".env", ptr32(0o1600)), "spec.files[0].mode"},
		{"m12", func(s *v1.GatewayProfileSpec) { s.Files = []v1.FileSource{{Path: "a"}} }, "exactly one of secretKeyRef and configMapKeyRef"},
		{"m13", func(s *v1.GatewayProfileSpec) {
			s.Files = []v1.FileSource{{Path: "a", SecretKeyRef: key, ConfigMapKeyRef: key}}
		}, "exactly one of secretKeyRef and configMapKeyRef"},
		{"m14", func(s *v1.GatewayProfileSpec) {
			s.Env = []v1.EnvVar{{Name: "AGENT_HOME", ValueFrom: &v1.EnvVarSource{SecretKeyRef: *key}}}
		}, "reserved"},
		{"m15", func(s *v1.GatewayProfileSpec) {
			s.Env = []v1.EnvVar{{Name: "TOKEN", Value: "x", ValueFrom: &v1.EnvVarSource{SecretKeyRef: *key}}}
		}, "at most one of value and valueFrom"},
		{"m16", func(s *v1.GatewayProfileSpec) {
			s.Env = []v1.EnvVar{{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: "../x", Key: "k"}}}}
		}, "spec.env[0].valueFrom.secretKeyRef.name"},
		{"m17", func(s *v1.GatewayProfileSpec) {
			s.Env = []v1.EnvVar{{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: "x", Key: "a/b"}}}}
		}, "spec.env[0].valueFrom.secretKeyRef.key"},
		{"m18", func(s *v1.GatewayProfileSpec) {
			s.EnvFrom = []v1.EnvFromSource{{Prefix: "LD_", SecretRef: v1.SecretReference{Name: "x"}}}
		}, "reserved"},
		{"m20", func(s *v1.GatewayProfileSpec) {
			s.EnvFrom = []v1.EnvFromSource{{Prefix: "1X", SecretRef: v1.SecretReference{Name: "x"}}}
		}, "spec.envFrom[0].prefix"},
		{"m19", func(s *v1.GatewayProfileSpec) {
			s.Files = make([]v1.FileSource, 33)
			for i := range s.Files {
				s.Files[i] = v1.FileSource{Path: "f" + strings.Repeat("x", i), SecretKeyRef: key}
			}
		}, "spec.files"},
		{"m21", func(s *v1.GatewayProfileSpec) {
			s.Isolation = v1.IsolationConvenience
			s.Files = []v1.FileSource{{Path: ".env", SecretKeyRef: key}}
		}, "need isolation Production"},
		{"m22", func(s *v1.GatewayProfileSpec) {
			s.Isolation = v1.IsolationConvenience
			s.EnvFrom = []v1.EnvFromSource{{SecretRef: v1.SecretReference{Name: "x"}}}
		}, "need isolation Production"},
		{"m23", func(s *v1.GatewayProfileSpec) {
			s.Isolation = v1.IsolationConvenience
			s.Env = []v1.EnvVar{{Name: "PLAIN", Value: "1"}, {Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: *key}}}
		}, "need isolation Production"},
	} {
		t.Run(tc.name, func(t *testing.T) { mustReject(t, p(tc.name, tc.mut), tc.want) })
	}
	// A Convenience profile keeps plain variables.
	mustCreate(t, p("convenience-env", func(s *v1.GatewayProfileSpec) {
		s.Isolation = v1.IsolationConvenience
		s.Env = []v1.EnvVar{{Name: "PLAIN", Value: "1"}}
	}))
	// An instance is checked on its own too.
	mustReject(t, &v1.GatewayInstance{
		ObjectMeta: metav1.ObjectMeta{Name: "conv.node-1"},
		Spec: v1.GatewayInstanceSpec{
			Profile: "conv", Host: "node-1",
			Release:         v1.ReleaseArtifact{Name: "r1", URL: "https://example.com/a.tgz", SHA256: sha, Label: "1.0.0"},
			GatewaySettings: v1.GatewaySettings{Isolation: v1.IsolationConvenience, Files: []v1.FileSource{{Path: ".env", SecretKeyRef: key}}},
		},
	}, "need isolation Production")
	mustCreate(t, p("material", func(s *v1.GatewayProfileSpec) {
		s.Env = []v1.EnvVar{{Name: "PLAIN", Value: "1"}, {Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: *key}}}
		s.EnvFrom = []v1.EnvFromSource{{Prefix: "APP_", SecretRef: v1.SecretReference{Name: "app-env"}}, {SecretRef: v1.SecretReference{Name: "keys"}}}
		s.Files = []v1.FileSource{
			{Path: ".env", SecretKeyRef: key},
			{Path: "config/app.yaml", Mode: ptr32(0o644), ConfigMapKeyRef: &v1.KeySelector{Name: "app-config", Key: "app.yaml"}},
			{Path: "config/key.pem", Mode: ptr32(0o400), SecretKeyRef: key},
		}
	}))
}
