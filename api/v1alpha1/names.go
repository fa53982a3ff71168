package v1alpha1

import (
	"fmt"
	"regexp"
	"slices"
)

// MaxProfileNameLength keeps `agent-<profile>` within Linux's 32-character user names.
const MaxProfileNameLength = 32 - len(ProfileUserPrefix)

// ProfileUserPrefix starts the system user name of every Production-isolated profile.
const ProfileUserPrefix = "agent-"

// ReservedProfileNames are not profile names: for each, agent-<name> is an account the node
// agent uses for something else, and a profile must never run as it. agent-microvm is the account
// QEMU runs tool-run microVMs as. The CRD schemas list the same names (gatewayprofile_types.go,
// gatewayinstance_types.go); names_test.go checks that they agree.
var ReservedProfileNames = []string{"microvm"}

var (
	profileNameRE = regexp.MustCompile(`^[a-z]([-a-z0-9]*[a-z0-9])?$`)
	hostNameRE    = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	labelRE       = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`)
	sha256RE      = regexp.MustCompile(`^[a-f0-9]{64}$`)
)

// ValidateProfileName checks a profile name the way the CRD schema does. The node agent calls it
// again before a name becomes a path, a unit name or a user name.
func ValidateProfileName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("profile name is empty")
	case len(name) > MaxProfileNameLength:
		return fmt.Errorf("profile name %q is %d characters; at most %d fit in the user name %s<profile>", name, len(name), MaxProfileNameLength, ProfileUserPrefix)
	case !profileNameRE.MatchString(name):
		return fmt.Errorf("profile name %q is not a DNS label starting with a letter (lowercase letters, digits and '-')", name)
	case slices.Contains(ReservedProfileNames, name):
		return fmt.Errorf("profile name %q is reserved: %s%s is an account the node agent uses for itself", name, ProfileUserPrefix, name)
	}
	return nil
}

// ValidateHostName checks a GatewayHost name: a DNS label.
func ValidateHostName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("host name is empty")
	case len(name) > 63:
		return fmt.Errorf("host name %q is %d characters; a DNS label has at most 63", name, len(name))
	case !hostNameRE.MatchString(name):
		return fmt.Errorf("host name %q is not a DNS label (lowercase letters, digits and '-')", name)
	}
	return nil
}

// ValidateReleaseLabel checks a release label, which becomes part of a folder name.
func ValidateReleaseLabel(label string) error {
	if len(label) == 0 || len(label) > 63 || !labelRE.MatchString(label) {
		return fmt.Errorf("release label %q must be 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit", label)
	}
	return nil
}

// ValidateSHA256 checks a sha256 digest: 64 lowercase hex digits.
func ValidateSHA256(sum string) error {
	if !sha256RE.MatchString(sum) {
		return fmt.Errorf("sha256 %q must be 64 lowercase hex digits", sum)
	}
	return nil
}

// InstanceName is the name of the GatewayInstance of a profile on a host.
func InstanceName(profile, host string) string { return profile + "." + host }
