package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
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

// TestStagingCondition: the GatewayHost says whether a gateway filling its home can keep the
// agent from staging a release.
func TestStagingCondition(t *testing.T) {
	for _, tc := range []struct {
		space  apply.StagingSpace
		err    error
		status metav1.ConditionStatus
		reason string
	}{
		{apply.StagingSpace{Shared: false}, nil, metav1.ConditionTrue, "SeparateFilesystem"},
		{apply.StagingSpace{Shared: true, Reserved: 1 << 30}, nil, metav1.ConditionTrue, "RootReserve"},
		{apply.StagingSpace{Shared: true, Reserved: 1 << 20}, nil, metav1.ConditionFalse, "NoRootReserve"},
		{apply.StagingSpace{}, errors.New("statfs: no such file"), metav1.ConditionUnknown, "NotMeasured"},
	} {
		c := stagingCondition(func() (apply.StagingSpace, error) { return tc.space, tc.err }, 3)
		if c.Type != ConditionStagingSpace || c.Status != tc.status || c.Reason != tc.reason || c.Message == "" || c.ObservedGeneration != 3 {
			t.Errorf("%+v / %v: condition %+v, want %s %s", tc.space, tc.err, c, tc.status, tc.reason)
		}
	}
	// Free space comes and goes: the condition does not follow it, or every heartbeat would
	// write the status.
	at := func(free uint64) string {
		return stagingCondition(func() (apply.StagingSpace, error) {
			return apply.StagingSpace{Shared: true, Reserved: 1 << 30, Available: free}, nil
		}, 3).Message
	}
	if a, b := at(1<<30), at(2<<30); a != b {
		t.Errorf("the condition changed with the free space: %q, then %q", a, b)
	}
}
