package layout

import (
	"strings"
	"testing"
)

// TestForProfileRefusesReservedNames: agent-microvm is the account QEMU runs as, so no profile
// may be called microvm, whatever reached the agent.
func TestForProfileRefusesReservedNames(t *testing.T) {
	if _, err := ForProfile("microvm"); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Fatalf("ForProfile(microvm) = %v, want a refusal naming the reserved name", err)
	}
	p, err := ForProfile("microvm2")
	if err != nil || p.User != "agent-microvm2" {
		t.Fatalf("ForProfile(microvm2) = %+v, %v", p, err)
	}
}

func TestProfileOfUser(t *testing.T) {
	for _, tc := range []struct {
		user, profile string
		ok            bool
	}{
		{"agent-core", "core", true},
		{"agent-microvm2", "microvm2", true},
		{"agent-microvm", "", false}, // reserved: the QEMU user belongs to no profile
		{"agent", "", false},
		{"agent-", "", false},
		{"agent-Core", "", false},
		{"qemu", "", false},
		{"gateway-microvm", "", false},
	} {
		p, ok := ProfileOfUser(tc.user)
		if ok != tc.ok || (ok && p != tc.profile) {
			t.Errorf("ProfileOfUser(%q) = %q, %v; want %q, %v", tc.user, p, ok, tc.profile, tc.ok)
		}
	}
}
