package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// TestProbeCapabilities shows that every capability the GatewayHost documents is written from
// what the host has: a Kata shim under the host's root, /dev/kvm the agent can open, and the
// agent's own microVM path.
func TestProbeCapabilities(t *testing.T) {
	root := t.TempDir()
	host := layout.Host{Root: root}
	_, kvmErr := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	wantKVM := kvmErr == nil

	c := probeCapabilities(host, false)
	if c.Kata || c.MicroVM || c.KVM != wantKVM {
		t.Fatalf("bare host: %+v, want no Kata, no MicroVM, KVM %v", c, wantKVM)
	}
	if c := probeCapabilities(host, true); !c.MicroVM {
		t.Errorf("agent serving tool runs: %+v, want MicroVM", c)
	}

	shim := filepath.Join(root, "opt/kata/bin/containerd-shim-kata-v2")
	if err := os.MkdirAll(filepath.Dir(shim), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(shim, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if c := probeCapabilities(host, false); c.Kata {
		t.Errorf("a shim that is not executable counts as Kata: %+v", c)
	}
	if err := os.Chmod(shim, 0o755); err != nil {
		t.Fatal(err)
	}
	if c := probeCapabilities(host, false); !c.Kata {
		t.Errorf("host with %s: %+v, want Kata", shim, c)
	}
}
