package unit

import (
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

func settings(t *testing.T) Settings {
	t.Helper()
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	return Settings{Profile: p, Mode: v1.EntrypointCLI, Isolation: v1.IsolationProduction}
}

func count(text, key string) int {
	n := 0
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, key+"=") {
			n++
		}
	}
	return n
}

func TestEnvFileDeclaresRuntimeOnceThroughCurrent(t *testing.T) {
	s := settings(t)
	s.Env = []v1.EnvVar{{Name: "TZ", Value: "UTC"}}
	env, err := EnvFile(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{EnvRoot, EnvPythonPath, EnvHome, EnvProfile, EnvMode, EnvExec, "PYTHONNOUSERSITE", "TZ"} {
		if n := count(env, k); n != 1 {
			t.Errorf("%s declared %d times in:\n%s", k, n, env)
		}
	}
	for _, want := range []string{
		`PYTHONPATH="/opt/agent/gateways/core/current"`,
		`AGENT_ROOT="/opt/agent/gateways/core/current"`,
		`AGENT_HOME="/opt/agent/gateways/core/home"`,
		`PYTHONNOUSERSITE="1"`,
	} {
		if !strings.Contains(env, want+"\n") {
			t.Errorf("env file lacks %s:\n%s", want, env)
		}
	}
	// The release is named only by where `current` resolves (the launcher sets these): an env
	// file that named it could disagree with `current` after an interrupted apply.
	for _, k := range []string{EnvReleaseSHA, EnvReleaseLabel} {
		if n := count(env, k); n != 0 {
			t.Errorf("the env file names the release (%s):\n%s", k, env)
		}
	}
}

func TestEnvFileRefusesOverridesAndContradictions(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(*Settings)
		want string
	}{
		{"PYTHONPATH", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "PYTHONPATH", Value: "/tmp"}} }, "reserved"},
		{"AGENT_ROOT", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "AGENT_ROOT", Value: "/tmp"}} }, "reserved"},
		{"PYTHONHOME", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "PYTHONHOME", Value: "/tmp"}} }, "reserved"},
		{"LD_PRELOAD", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "LD_PRELOAD", Value: "/x.so"}} }, "reserved"},
		{"twice", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "A", Value: "1"}, {Name: "A", Value: "2"}} }, "twice"},
		{"newline", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "A", Value: "1\nPYTHONPATH=/tmp"}} }, "one line"},
		{"bad name", func(s *Settings) { s.Env = []v1.EnvVar{{Name: "A-B", Value: "1"}} }, "not a valid"},
		{"cli with exec", func(s *Settings) { s.Exec = "x.py" }, "mode is cli"},
		{"script without exec", func(s *Settings) { s.Mode = v1.EntrypointScript }, "exec is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := settings(t)
			tc.mut(&s)
			_, err := EnvFile(s)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("EnvFile error = %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestEnvFileQuoting(t *testing.T) {
	s := settings(t)
	s.Env = []v1.EnvVar{{Name: "GREETING", Value: `say "hi" $HOME \ ok`}}
	env, err := EnvFile(s)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(env, `GREETING="say \"hi\" \$HOME \\ ok"`) {
		t.Errorf("quoting:\n%s", env)
	}
}

func TestUnitsSetNoPythonPathAndNoDependencies(t *testing.T) {
	s := settings(t)
	s.Egress = []string{"10.0.0.0/8", "localhost"}
	for name, text := range map[string]string{"template": Template(), "production": DropIn(s), "convenience": DropIn(Settings{Profile: s.Profile, Isolation: v1.IsolationConvenience})} {
		if SetsPythonPath(text) {
			t.Errorf("%s sets PYTHONPATH:\n%s", name, text)
		}
		for _, dep := range []string{"Requires=", "PartOf=", "BindsTo=", "Requisite="} {
			if strings.Contains(text, dep) {
				t.Errorf("%s has %s, tying instances together", name, dep)
			}
		}
	}
	if !strings.Contains(Template(), "Type=exec") || !strings.Contains(Template(), "EnvironmentFile=/opt/agent/gateways/%i/env") {
		t.Errorf("template:\n%s", Template())
	}
	prod := DropIn(s)
	for _, want := range []string{"User=agent-core", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
		"NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "IPAddressDeny=any", "IPAddressAllow=10.0.0.0/8 localhost",
		"ReadWritePaths=/opt/agent/gateways/core/home /opt/agent/gateways/core/logs"} {
		if !strings.Contains(prod, want) {
			t.Errorf("production drop-in lacks %q:\n%s", want, prod)
		}
	}
	if conv := DropIn(Settings{Profile: s.Profile, Isolation: v1.IsolationConvenience}); !strings.Contains(conv, "User="+SharedUser) || strings.Contains(conv, "ProtectSystem") {
		t.Errorf("convenience drop-in:\n%s", conv)
	}
}

func TestSetsPythonPath(t *testing.T) {
	for text, want := range map[string]bool{
		"[Service]\nEnvironment=PYTHONPATH=/x\n":       true,
		"[Service]\nEnvironment=\"A=1\" PYTHONPATH=/x": true,
		"[Service]\nPassEnvironment=PYTHONPATH\n":      true,
		"# PYTHONPATH is set by the env file\n":        false,
		"[Service]\nEnvironment=A=1\n":                 false,
	} {
		if got := SetsPythonPath(text); got != want {
			t.Errorf("SetsPythonPath(%q) = %v, want %v", text, got, want)
		}
	}
}

// TestDropInCapsResources: both modes cap memory (without swap) and tasks, with the API's
// defaults when the instance leaves them unset.
func TestDropInCapsResources(t *testing.T) {
	for _, tc := range []struct {
		name            string
		iso             v1.IsolationMode
		memory, tasks   int64
		wantMem, wantTs string
	}{
		{"production defaults", v1.IsolationProduction, 0, 0, "1073741824", "512"},
		{"production set", v1.IsolationProduction, 256 << 20, 64, "268435456", "64"},
		{"convenience defaults", v1.IsolationConvenience, 0, 0, "1073741824", "512"},
		{"convenience set", v1.IsolationConvenience, 2 << 30, 4096, "2147483648", "4096"},
		{"only tasks set", v1.IsolationProduction, 0, 100, "1073741824", "100"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := settings(t)
			s.Isolation, s.MemoryMax, s.TasksMax = tc.iso, tc.memory, tc.tasks
			d := DropIn(s)
			for key, want := range map[string]string{"MemoryMax": tc.wantMem, "MemorySwapMax": "0", "TasksMax": tc.wantTs} {
				if n := count(d, key); n != 1 {
					t.Errorf("%s set %d times", key, n)
				}
				if !strings.Contains(d, "\n"+key+"="+want+"\n") {
					t.Errorf("drop-in lacks %s=%s:\n%s", key, want, d)
				}
			}
			if _, err := EnvFile(s); err != nil {
				t.Errorf("EnvFile refused caps in bounds: %v", err)
			}
		})
	}
}

// TestEnvFileRefusesCapsOutOfBounds: the agent checks the API's bounds again before a cap
// reaches a unit.
func TestEnvFileRefusesCapsOutOfBounds(t *testing.T) {
	for _, tc := range []struct {
		name          string
		memory, tasks int64
		want          string // "" when accepted
	}{
		{"memory at min", 64 << 20, 0, ""},
		{"memory at max", 64 << 30, 0, ""},
		{"memory below min", 64<<20 - 1, 0, "resources.memoryMax 67108863 is outside 64Mi to 64Gi"},
		{"memory above max", 64<<30 + 1, 0, "resources.memoryMax"},
		{"memory negative", -1, 0, "resources.memoryMax -1 is outside"},
		{"tasks at min", 0, 16, ""},
		{"tasks at max", 0, 65536, ""},
		{"tasks below min", 0, 15, "resources.tasksMax 15 is outside 16 to 65536"},
		{"tasks above max", 0, 65537, "resources.tasksMax 65537"},
		{"tasks negative", 0, -1, "resources.tasksMax -1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := settings(t)
			s.MemoryMax, s.TasksMax = tc.memory, tc.tasks
			_, err := EnvFile(s)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("EnvFile refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("EnvFile error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestEnvFileCarriesTheMaterialDigest: a running process shows the material it started with.
func TestEnvFileCarriesTheMaterialDigest(t *testing.T) {
	s := settings(t)
	env, _ := EnvFile(s)
	if strings.Contains(env, EnvMaterialDigest) {
		t.Errorf("a profile without material declares a digest:\n%s", env)
	}
	s.MaterialDigest = "sha256:" + strings.Repeat("e", 64)
	env, err := EnvFile(s)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(env, EnvMaterialDigest+`="sha256:eeee`) {
		t.Errorf("no digest:\n%s", env)
	}
}
