package unit

import (
	"fmt"
	"math"

	"k8s.io/apimachinery/pkg/api/resource"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// FromSpec turns a GatewayInstance's settings into the Settings rendered for it, with the
// defaults the node agent applies (cli mode, Production isolation) and the interpreter the
// agent runs (DefaultPython when empty). The renderers check the values; this only converts.
// `kubectl gateway render` uses it to show a host's files without reaching the host, so a
// variable from a Secret gets a placeholder naming the Secret and key, never a value.
func FromSpec(p layout.Profile, s v1.GatewaySettings, python string) Settings {
	out := Settings{Profile: p, Mode: s.Mode, Exec: s.Exec, Isolation: s.Isolation, Python: python}
	for _, e := range s.Env {
		if e.ValueFrom != nil {
			// Shown off-host, where no secret value is read: a placeholder names its source.
			ref := e.ValueFrom.SecretKeyRef
			e = v1.EnvVar{Name: e.Name, Value: fmt.Sprintf("<from secret %s key %s>", ref.Name, ref.Key)}
		}
		out.Env = append(out.Env, e)
	}
	if out.Mode == "" {
		out.Mode = v1.EntrypointCLI
	}
	if out.Isolation == "" {
		out.Isolation = v1.IsolationProduction
	}
	for _, e := range s.EgressAllowlist {
		out.Egress = append(out.Egress, string(e))
	}
	if q := s.Resources.MemoryMax; q != nil {
		// A quantity beyond int64 becomes the largest int64 of its sign, which EnvFile refuses,
		// instead of wrapping around into range.
		switch {
		case q.Cmp(*resource.NewQuantity(math.MaxInt64, resource.BinarySI)) > 0:
			out.MemoryMax = math.MaxInt64
		case q.Cmp(*resource.NewQuantity(math.MinInt64, resource.BinarySI)) < 0:
			out.MemoryMax = math.MinInt64
		default:
			out.MemoryMax = q.Value()
		}
	}
	out.TasksMax = int64(s.Resources.TasksMax)
	return out
}
