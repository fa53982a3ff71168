package v1alpha1_test

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

func secret(name, uid string, data map[string]string) *corev1.Secret {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(uid), Labels: map[string]string{v1.MaterialLabel: "true"}},
		Data: map[string][]byte{}}
	for k, v := range data {
		s.Data[k] = []byte(v)
	}
	return s
}

func materialSettings() *v1.GatewaySettings {
	return &v1.GatewaySettings{
		Env: []v1.EnvVar{{Name: "PLAIN", Value: "1"},
			{Name: "TOKEN", ValueFrom: &v1.EnvVarSource{SecretKeyRef: v1.KeySelector{Name: "creds", Key: "token"}}}},
		EnvFrom: []v1.EnvFromSource{{Prefix: "APP_", SecretRef: v1.SecretReference{Name: "app"}}},
		Files: []v1.FileSource{
			{Path: "config/app.yaml", ConfigMapKeyRef: &v1.KeySelector{Name: "cfg", Key: "app.yaml"}},
			{Path: ".env", Mode: ptr32(0o400), SecretKeyRef: &v1.KeySelector{Name: "creds", Key: "dotenv"}},
		},
	}
}

func TestResolveMaterial(t *testing.T) {
	secrets := map[string]*corev1.Secret{
		"creds": secret("creds", "u1", map[string]string{"token": "s3cr3t", "dotenv": "A=1\n"}),
		"app":   secret("app", "u2", map[string]string{"PORT": "80", "HOST": "h"}),
	}
	cms := map[string]*corev1.ConfigMap{"cfg": {ObjectMeta: metav1.ObjectMeta{Name: "cfg", UID: "u3", Labels: map[string]string{v1.MaterialLabel: "true"}}, Data: map[string]string{"app.yaml": "a: 1\n"}}}
	s := materialSettings()
	m, err := v1.ResolveMaterial(s, secrets, cms)
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, e := range m.Env {
		env = append(env, e.Name+"="+e.Value)
	}
	if got, want := strings.Join(env, " "), "PLAIN=1 TOKEN=s3cr3t APP_HOST=h APP_PORT=80"; got != want {
		t.Errorf("env = %s; want %s", got, want)
	}
	if len(m.Files) != 2 || m.Files[0].Path != ".env" || m.Files[0].Mode != 0o400 || m.Files[1].Mode != 0o600 || string(m.Files[1].Data) != "a: 1\n" {
		t.Errorf("files = %+v", m.Files)
	}
	if !strings.HasPrefix(m.Digest, "sha256:") || strings.Contains(m.Digest, "s3cr3t") {
		t.Errorf("digest %q", m.Digest)
	}
	secNames, cmNames := s.MaterialRefs()
	if strings.Join(secNames, ",") != "app,creds" || strings.Join(cmNames, ",") != "cfg" {
		t.Errorf("refs = %v %v", secNames, cmNames)
	}

	// The same material gives the same digest; a changed value, or the same value in a
	// recreated Secret, gives another.
	again, _ := v1.ResolveMaterial(s, secrets, cms)
	if again.Digest != m.Digest {
		t.Error("digest is not stable")
	}
	secrets["creds"] = secret("creds", "u1", map[string]string{"token": "rotated", "dotenv": "A=1\n"})
	rotated, _ := v1.ResolveMaterial(s, secrets, cms)
	secrets["creds"] = secret("creds", "u9", map[string]string{"token": "s3cr3t", "dotenv": "A=1\n"})
	recreated, _ := v1.ResolveMaterial(s, secrets, cms)
	if rotated.Digest == m.Digest || recreated.Digest == m.Digest {
		t.Error("a changed value or UID kept the digest")
	}
}

func TestResolveMaterialRefusesBadInput(t *testing.T) {
	good := func() (map[string]*corev1.Secret, map[string]*corev1.ConfigMap) {
		return map[string]*corev1.Secret{
			"creds": secret("creds", "u1", map[string]string{"token": "s3cr3t", "dotenv": "x"}),
			"app":   secret("app", "u2", map[string]string{"PORT": "80"}),
		}, map[string]*corev1.ConfigMap{"cfg": {ObjectMeta: metav1.ObjectMeta{Name: "cfg", Labels: map[string]string{v1.MaterialLabel: "true"}}, Data: map[string]string{"app.yaml": "a"}}}
	}
	for _, tc := range []struct {
		name, reason, want string
		mut                func(*v1.GatewaySettings, map[string]*corev1.Secret, map[string]*corev1.ConfigMap)
	}{
		{"missing secret", v1.ReasonMaterialNotFound, `Secret "creds" not found`, func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			delete(s, "creds")
		}},
		{"unlabeled secret", v1.ReasonMaterialNotFound, `Secret "creds" not found or not labeled gateway.agent.dev/material="true"`, func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["creds"].Labels = nil
		}},
		{"unlabeled envFrom secret", v1.ReasonMaterialNotFound, `Secret "app" not found or not labeled`, func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["app"].Labels[v1.MaterialLabel] = "false"
		}},
		{"unlabeled configmap", v1.ReasonMaterialNotFound, `ConfigMap "cfg" not found or not labeled`, func(_ *v1.GatewaySettings, _ map[string]*corev1.Secret, c map[string]*corev1.ConfigMap) {
			c["cfg"].Labels = nil
		}},
		{"missing key", v1.ReasonMaterialNotFound, `Secret "creds" has no key "token"`, func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			delete(s["creds"].Data, "token")
		}},
		{"missing configmap key", v1.ReasonMaterialNotFound, `ConfigMap "cfg" has no key`, func(_ *v1.GatewaySettings, _ map[string]*corev1.Secret, c map[string]*corev1.ConfigMap) {
			c["cfg"].Data = nil
		}},
		{"env value too large", v1.ReasonMaterialInvalid, "TOKEN is more than 4096 bytes", func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["creds"].Data["token"] = []byte(strings.Repeat("s", 4097))
		}},
		{"env value on two lines", v1.ReasonMaterialInvalid, "one line", func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["creds"].Data["token"] = []byte("a\nPYTHONPATH=/tmp")
		}},
		{"file too large", v1.ReasonMaterialInvalid, `key "dotenv" is more than 262144 bytes`, func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["creds"].Data["dotenv"] = make([]byte, v1.MaxFileBytes+1)
		}},
		{"material too large in all", v1.ReasonMaterialInvalid, "more than 1048576 bytes in all", func(g *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["creds"].Data["dotenv"] = make([]byte, v1.MaxFileBytes)
			for _, p := range []string{"b1", "b2", "b3", "b4"} {
				g.Files = append(g.Files, v1.FileSource{Path: p, SecretKeyRef: &v1.KeySelector{Name: "creds", Key: "dotenv"}})
			}
		}},
		{"envFrom reserved key", v1.ReasonMaterialInvalid, "reserved", func(g *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.EnvFrom[0].Prefix = ""
			s["app"].Data["LD_PRELOAD"] = []byte("/tmp/x.so")
		}},
		{"envFrom bad key", v1.ReasonMaterialInvalid, "not a variable name", func(_ *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			s["app"].Data["a-b"] = []byte("x")
		}},
		{"envFrom twice", v1.ReasonMaterialInvalid, "set twice", func(g *v1.GatewaySettings, s map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.EnvFrom[0].Prefix = ""
			s["app"].Data["PLAIN"] = []byte("x")
		}},
		{"path outside home", v1.ReasonMaterialInvalid, "stay inside home", func(g *v1.GatewaySettings, _ map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.Files[0].Path = "config/../../../etc/shadow"
		}},
		{"file inside a file", v1.ReasonMaterialInvalid, "cannot both exist", func(g *v1.GatewaySettings, _ map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.Files[1].Path = "config/app.yaml/x"
		}},
		{"convenience isolation", v1.ReasonMaterialInvalid, "need isolation Production", func(g *v1.GatewaySettings, _ map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.Isolation = v1.IsolationConvenience
		}},
		{"group-writable mode", v1.ReasonMaterialInvalid, "neither group nor others write", func(g *v1.GatewaySettings, _ map[string]*corev1.Secret, _ map[string]*corev1.ConfigMap) {
			g.Files[0].Mode = ptr32(0o660)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := materialSettings()
			secrets, cms := good()
			tc.mut(s, secrets, cms)
			_, err := v1.ResolveMaterial(s, secrets, cms)
			var me *v1.MaterialError
			if !errors.As(err, &me) || me.Reason != tc.reason || !strings.Contains(me.Msg, tc.want) {
				t.Fatalf("err = %v; want %s mentioning %q", err, tc.reason, tc.want)
			}
			// Neither a value nor its exact size.
			if strings.Contains(me.Msg, "s3cr3t") || strings.Contains(me.Msg, "PYTHONPATH=/tmp") ||
				strings.Contains(me.Msg, "4097") || strings.Contains(me.Msg, "262145") || strings.Contains(me.Msg, "13107") {
				t.Errorf("message carries a value: %s", me.Msg)
			}
		})
	}
}
