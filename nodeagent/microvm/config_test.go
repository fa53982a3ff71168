package microvm_test

import (
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
)

// TestConfigRefusesSharedOrRootIDsAndOversizedPools: every VM needs a uid and gid of its own,
// and the pool cannot be larger than the VMs that may exist at once.
func TestConfigRefusesSharedOrRootIDsAndOversizedPools(t *testing.T) {
	// Were a check missing, NewRunner would go on to prepare its work folder: a temporary one.
	base := microvm.Config{Systemd: &systemd.Conn{}, QEMU: "/bin/true", WorkDir: t.TempDir()}
	two := []microvm.ID{{UID: 64531, GID: 64531}, {UID: 64532, GID: 64532}}
	for name, tc := range map[string]struct {
		change func(*microvm.Config)
		want   string
	}{
		"shared uid":   {func(c *microvm.Config) { c.IDs = []microvm.ID{{UID: 64531, GID: 64531}, {UID: 64531, GID: 64532}} }, "given twice"},
		"shared gid":   {func(c *microvm.Config) { c.IDs = []microvm.ID{{UID: 64531, GID: 64531}, {UID: 64532, GID: 64531}} }, "given twice"},
		"root":         {func(c *microvm.Config) { c.IDs = []microvm.ID{{UID: 0, GID: 64531}} }, "non-root"},
		"more VMs":     {func(c *microvm.Config) { c.IDs, c.MaxConcurrent = two, 3 }, "need as many users"},
		"big pool":     {func(c *microvm.Config) { c.IDs, c.PoolSize = two, 3 }, "pool size"},
		"neg pool":     {func(c *microvm.Config) { c.IDs, c.PoolSize = two, -1 }, "pool size"},
		"no user left": {func(c *microvm.Config) { c.IDs, c.MaxConcurrent, c.PoolSize = two, 1, 2 }, "pool size"},
	} {
		cfg := base
		tc.change(&cfg)
		if _, err := microvm.NewRunner(cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", name, err, tc.want)
		}
	}
}
