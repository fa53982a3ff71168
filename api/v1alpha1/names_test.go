package v1alpha1

import (
	"os"
	"slices"
	"strings"
	"testing"
)

func TestValidateProfileName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"core", true},
		{"api", true},
		{"mcp-sse-2", true},
		{strings.Repeat("a", 26), true},
		{strings.Repeat("a", 27), false},
		{"", false},
		{"Core", false},
		{"../etc", false},
		{"a/b", false},
		{"a.b", false},
		{"1core", false},
		{"core-", false},
		{"-core", false},
		{"co re", false},
		{"core\n", false},
		// agent-microvm is the node agent's QEMU user.
		{"microvm", false},
		{"microvm2", true},
		{"my-microvm", true},
	} {
		err := ValidateProfileName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateProfileName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestValidateHostName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"node-1", true},
		{"1node", true},
		{strings.Repeat("h", 63), true},
		{strings.Repeat("h", 64), false},
		{"node.example.com", false},
		{"Node", false},
		{"", false},
		{"..", false},
	} {
		if err := ValidateHostName(tc.name); (err == nil) != tc.ok {
			t.Errorf("ValidateHostName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestValidateReleaseLabelAndSHA(t *testing.T) {
	for _, l := range []string{"1.0.0", "v2_rc1", "a"} {
		if err := ValidateReleaseLabel(l); err != nil {
			t.Errorf("label %q: %v", l, err)
		}
	}
	for _, l := range []string{"", "..", ".hidden", "a/b", "-x", strings.Repeat("a", 64), "a b"} {
		if err := ValidateReleaseLabel(l); err == nil {
			t.Errorf("label %q accepted", l)
		}
	}
	if err := ValidateSHA256(strings.Repeat("ab", 32)); err != nil {
		t.Error(err)
	}
	for _, s := range []string{strings.Repeat("AB", 32), strings.Repeat("a", 63), strings.Repeat("g", 64), ""} {
		if err := ValidateSHA256(s); err == nil {
			t.Errorf("sha256 %q accepted", s)
		}
	}
}

// FuzzValidateProfileName checks the promises the agent relies on for every accepted name: it
// is safe as one path segment, as a systemd instance name and as part of a Linux user name.
func FuzzValidateProfileName(f *testing.F) {
	for _, s := range []string{"core", "api", "../etc", "Core", strings.Repeat("a", 63), "a-b", "a\x00b", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if ValidateProfileName(name) != nil {
			return
		}
		if slices.Contains(ReservedProfileNames, name) {
			t.Fatalf("accepted the reserved name %q", name)
		}
		if len(ProfileUserPrefix+name) > 32 {
			t.Fatalf("accepted %q: user name too long", name)
		}
		if name == "." || name == ".." || strings.ContainsAny(name, "/.\\@\x00 \n") {
			t.Fatalf("accepted %q: unsafe in a path, unit or user name", name)
		}
		for _, r := range name {
			if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' {
				t.Fatalf("accepted %q: character %q", name, r)
			}
		}
	})
}

// TestReservedNamesInSchemas checks that the CRD rules refuse exactly ReservedProfileNames: the
// schema markers cannot refer to the Go list, so the two are compared here.
func TestReservedNamesInSchemas(t *testing.T) {
	quoted := make([]string, len(ReservedProfileNames))
	for i, n := range ReservedProfileNames {
		quoted[i] = "'" + n + "'"
	}
	list := "[" + strings.Join(quoted, ", ") + "]"
	for file, rule := range map[string]string{
		"gatewayprofile_types.go":  `rule="!(self.metadata.name in ` + list + `)"`,
		"gatewayinstance_types.go": `rule="!(self in ` + list + `)"`,
	} {
		src, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(src), rule) {
			t.Errorf("%s has no schema rule %s", file, rule)
		}
	}
}
