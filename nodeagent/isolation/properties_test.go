package isolation

import (
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/isolation/probe"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
)

func production(t *testing.T, egress ...string) unit.Settings {
	t.Helper()
	p, err := layout.ForProfile("core")
	if err != nil {
		t.Fatal(err)
	}
	return unit.Settings{Profile: p, Isolation: v1.IsolationProduction, Egress: egress}
}

// dbusAddrs builds an IPAddressAllow/IPAddressDeny value as go-systemd decodes it.
func dbusAddrs(prefixes ...string) [][]any {
	out := [][]any{}
	for _, s := range prefixes {
		p := netip.MustParsePrefix(s)
		family := int32(afInet)
		if p.Addr().Is6() {
			family = afInet6
		}
		out = append(out, []any{family, p.Addr().AsSlice(), uint32(p.Bits())})
	}
	return out
}

// effective is what systemd reports for a unit running core's rendered drop-in.
func effective() map[string]any {
	return map[string]any{
		"User": "agent-core", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": true,
		"NoNewPrivileges": true, "CapabilityBoundingSet": uint64(0),
		"IPAddressDeny":  dbusAddrs("0.0.0.0/0", "::/0"),
		"IPAddressAllow": dbusAddrs("10.0.0.0/8", "127.0.0.0/8", "::1/128"),
		"ReadWritePaths": []string{"/opt/agent/gateways/core/home", "/opt/agent/gateways/core/logs"},
	}
}

func TestParseDropInReadsTheRenderedSandbox(t *testing.T) {
	e, err := parseDropIn(unit.DropIn(production(t, "localhost", "10.1.2.3/8")))
	if err != nil {
		t.Fatal(err)
	}
	if e.user != "agent-core" || e.protectSystem != "strict" || e.protectHome != "yes" || !e.privateTmp || !e.noNewPrivileges || e.capabilities != 0 {
		t.Errorf("parsed %+v", e)
	}
	if !sameNetworks(e.deny, []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}) {
		t.Errorf("deny %v", e.deny)
	}
	if !sameNetworks(e.allow, []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}) {
		t.Errorf("allow %v", e.allow)
	}
	if strings.Join(e.readWrite, " ") != "/opt/agent/gateways/core/home /opt/agent/gateways/core/logs" {
		t.Errorf("read-write paths %v", e.readWrite)
	}
}

func TestParseDropInFollowsSystemdAssignmentRules(t *testing.T) {
	e, err := parseDropIn("[Service]\nUser=a\nUser=b\nProtectSystem=true\nProtectHome=read-only\nPrivateTmp=on\nNoNewPrivileges=0\n" +
		"CapabilityBoundingSet=\nIPAddressAllow=10.0.0.1\nIPAddressAllow=\nIPAddressAllow=multicast\nReadWritePaths=/x\nReadWritePaths=/y /z\n")
	if err != nil {
		t.Fatal(err)
	}
	if e.user != "b" || e.protectSystem != "yes" || e.protectHome != "read-only" || !e.privateTmp || e.noNewPrivileges {
		t.Errorf("parsed %+v", e)
	}
	if len(e.allow) != 2 || !e.allow[0].Contains(netip.MustParseAddr("224.0.0.1")) {
		t.Errorf("an empty IPAddressAllow= must reset the list: %v", e.allow)
	}
	if strings.Join(e.readWrite, " ") != "/x /y /z" {
		t.Errorf("read-write paths %v", e.readWrite)
	}
	for _, bad := range []string{
		unit.DropIn(unit.Settings{Isolation: v1.IsolationConvenience}), // sets no hardening at all
		strings.Replace(unit.DropIn(production(t)), "CapabilityBoundingSet=", "CapabilityBoundingSet=CAP_CHOWN", 1),
		strings.Replace(unit.DropIn(production(t)), "IPAddressDeny=any", "IPAddressDeny=everything", 1),
	} {
		if _, err := parseDropIn(bad); err == nil {
			t.Errorf("parsed a drop-in it cannot compare:\n%s", bad)
		}
	}
}

func TestComparePropertiesNamesEachDifference(t *testing.T) {
	want, err := parseDropIn(unit.DropIn(production(t, "localhost", "10.0.0.0/8")))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range compareProperties(want, effective()) {
		if !c.Passed {
			t.Errorf("%s failed on the rendered values: %s", c.Name, c.Message)
		}
	}
	for _, tc := range []struct {
		check string
		value any
	}{
		{CheckUser, "agent"},
		{CheckProtectSystem, "full"},
		{CheckProtectHome, "no"},
		{CheckPrivateTmp, false},
		{CheckNoNewPrivileges, nil},
		{CheckCapabilityBoundingSet, uint64(1) << 21},
		{CheckIPAddressDeny, dbusAddrs()},
		{CheckIPAddressDeny, dbusAddrs("0.0.0.0/0")},
		{CheckIPAddressAllow, dbusAddrs("10.0.0.0/8", "127.0.0.0/8", "::1/128", "0.0.0.0/0")},
		{CheckIPAddressAllow, [][]any{{int32(afInet), []byte{10, 0, 0}, uint32(8)}}},
		{CheckIPAddressAllow, "10.0.0.0/8"},
		{CheckReadWritePaths, []string{"/opt/agent/gateways/core/home", "/opt/agent/gateways/core/logs", "/var"}},
	} {
		got := effective()
		got[tc.check] = tc.value
		failed := []string{}
		for _, c := range compareProperties(want, got) {
			if !c.Passed {
				failed = append(failed, c.Name)
			}
		}
		if len(failed) != 1 || failed[0] != tc.check {
			t.Errorf("%s=%v: failed checks %v, want only %s", tc.check, tc.value, failed, tc.check)
		}
	}
}

func TestSameNetworksAllowsReducedLists(t *testing.T) {
	p := func(ss ...string) []netip.Prefix {
		out := []netip.Prefix{}
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	for _, tc := range []struct {
		a, b []netip.Prefix
		same bool
	}{
		{p(), p(), true},
		{p("10.0.0.0/8", "10.1.0.0/16"), p("10.0.0.0/8"), true}, // systemd drops covered prefixes
		{p("10.0.0.0/8"), p("10.0.0.0/9"), false},
		{p("0.0.0.0/0"), p("0.0.0.0/0", "::/0"), false},
		{p("::/0"), p("0.0.0.0/0"), false},
	} {
		if got := sameNetworks(tc.a, tc.b); got != tc.same {
			t.Errorf("sameNetworks(%v, %v) = %v", tc.a, tc.b, got)
		}
	}
}

func TestProbeChecksNameTheFailedBits(t *testing.T) {
	failedNames := func(cs []Check) []string {
		var out []string
		for _, c := range cs {
			if !c.Passed {
				out = append(out, c.Name)
			}
		}
		return out
	}
	for _, tc := range []struct {
		name     string
		status   int
		err      error
		addr     string
		accepted int64
		failed   string
	}{
		{"all held", 0, nil, "127.0.0.1:1", 0, ""},
		{"home", probe.HomeReadable, nil, "127.0.0.1:1", 0, CheckSiblingHomes},
		{"env", probe.FileReadable, nil, "127.0.0.1:1", 0, CheckSiblingEnvFiles},
		{"etc", probe.Writable, nil, "127.0.0.1:1", 0, CheckEtcReadOnly},
		{"egress", probe.Connected, nil, "127.0.0.1:1", 0, CheckEgressDenied},
		{"caps", probe.Capable, nil, "127.0.0.1:1", 0, CheckNoCapabilities},
		{"two", probe.HomeReadable | probe.Capable, nil, "127.0.0.1:1", 0, CheckSiblingHomes + "," + CheckNoCapabilities},
		{"listener saw a connection", 0, nil, "127.0.0.1:1", 1, CheckEgressDenied},
		{"no address outside the allowlist", 0, nil, "", 0, CheckEgressDenied},
		{"run failed", 0, errors.New("timeout"), "127.0.0.1:1", 0, "all"},
		{"bad arguments", probe.ExitUsage, nil, "127.0.0.1:1", 0, "all"},
		{"could not switch user", 217, nil, "127.0.0.1:1", 0, "all"},
	} {
		cs := probeChecks(tc.status, tc.err, []string{"api"}, tc.addr, tc.accepted)
		got := strings.Join(failedNames(cs), ",")
		want := tc.failed
		if want == "all" {
			want = strings.Join([]string{CheckProbeRan, CheckSiblingHomes, CheckSiblingEnvFiles, CheckEtcReadOnly, CheckEgressDenied, CheckNoCapabilities}, ",")
		}
		if got != want || len(cs) != 6 {
			t.Errorf("%s: %d checks, failed %q, want %q", tc.name, len(cs), got, want)
		}
	}
}

func TestEvidenceNamesTheFirstFailure(t *testing.T) {
	e := newEvidence([]Check{{Name: "A", Passed: true}, {Name: "B", Message: "b broke"}, {Name: "C"}}, "1.0")
	if e.Isolated || e.Failed != "B" || e.Message() != "isolation check B failed: b broke" {
		t.Errorf("%+v: %s", e, e.Message())
	}
	if e := newEvidence([]Check{{Name: "A", Passed: true}}, "1.0"); !e.Isolated || e.Failed != "" {
		t.Errorf("%+v", e)
	}
	if e := newEvidence(nil, ""); e.Isolated {
		t.Error("no evidence must not mean Isolated")
	}
}

func TestListenOutsideAvoidsTheAllowlist(t *testing.T) {
	tgt, err := listenOutside([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")})
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.close()
	if ap, err := netip.ParseAddrPort(tgt.addr); err != nil || ap.Addr() != netip.MustParseAddr("127.0.0.2") {
		t.Errorf("listened on %s, want 127.0.0.2 next to the allowed 127.0.0.1", tgt.addr)
	}
	if _, err := listenOutside([]netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}); err == nil {
		t.Error("listened although the allowlist covers everything")
	}
}

func TestSiblingsListsOtherProfileFolders(t *testing.T) {
	host := layout.Host{Root: t.TempDir()}
	for _, d := range []string{"core", "api", "web", "Not_A_Profile"} {
		if err := os.MkdirAll(host.On(layout.GatewaysDir+"/"+d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(host.On(layout.GatewaysDir+"/file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Siblings(host, "core")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range got {
		names = append(names, p.Name)
	}
	if strings.Join(names, ",") != "api,web" {
		t.Errorf("siblings of core: %v", names)
	}
}
