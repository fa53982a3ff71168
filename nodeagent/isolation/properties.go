package isolation

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Names of the property checks: each is the systemd setting it compares.
const (
	CheckUser                  = "User"
	CheckProtectSystem         = "ProtectSystem"
	CheckProtectHome           = "ProtectHome"
	CheckPrivateTmp            = "PrivateTmp"
	CheckNoNewPrivileges       = "NoNewPrivileges"
	CheckCapabilityBoundingSet = "CapabilityBoundingSet"
	CheckIPAddressDeny         = "IPAddressDeny"
	CheckIPAddressAllow        = "IPAddressAllow"
	CheckReadWritePaths        = "ReadWritePaths"
)

// propertyChecks lists the property checks in the order they are reported.
var propertyChecks = []string{CheckUser, CheckProtectSystem, CheckProtectHome, CheckPrivateTmp, CheckNoNewPrivileges,
	CheckCapabilityBoundingSet, CheckIPAddressDeny, CheckIPAddressAllow, CheckReadWritePaths}

// expected is what a rendered drop-in sets for each checked property.
type expected struct {
	user, protectSystem, protectHome string
	privateTmp, noNewPrivileges      bool
	capabilities                     uint64
	deny, allow                      []netip.Prefix
	readWrite                        []string
}

// parseDropIn reads the checked properties from a drop-in's text the way systemd does: the last
// assignment of a single value wins; list settings accumulate and an empty assignment resets
// them. A checked single-value setting the drop-in does not set is an error: the comparison
// would have nothing to compare with.
func parseDropIn(text string) (expected, error) {
	var e expected
	set := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		var err error
		switch k {
		case CheckUser:
			e.user = v
		case CheckProtectSystem:
			e.protectSystem = normalizeTristate(v)
		case CheckProtectHome:
			e.protectHome = normalizeTristate(v)
		case CheckPrivateTmp:
			e.privateTmp, err = parseBool(v)
		case CheckNoNewPrivileges:
			e.noNewPrivileges, err = parseBool(v)
		case CheckCapabilityBoundingSet:
			// The agent renders only the empty set; naming capabilities would need systemd's table.
			if v != "" {
				err = fmt.Errorf("only an empty set can be compared, not %q", v)
			}
		case CheckIPAddressDeny:
			e.deny, err = appendPrefixes(e.deny, v)
		case CheckIPAddressAllow:
			e.allow, err = appendPrefixes(e.allow, v)
		case CheckReadWritePaths:
			if v == "" {
				e.readWrite = nil
			} else {
				e.readWrite = append(e.readWrite, strings.Fields(v)...)
			}
		default:
			continue
		}
		if err != nil {
			return expected{}, fmt.Errorf("drop-in %s=%s: %w", k, v, err)
		}
		set[k] = true
	}
	for _, k := range []string{CheckUser, CheckProtectSystem, CheckProtectHome, CheckPrivateTmp, CheckNoNewPrivileges, CheckCapabilityBoundingSet} {
		if !set[k] {
			return expected{}, fmt.Errorf("the drop-in does not set %s", k)
		}
	}
	return e, nil
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "yes", "y", "true", "t", "on":
		return true, nil
	case "0", "no", "n", "false", "f", "off":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean")
}

// normalizeTristate writes ProtectSystem=/ProtectHome= values the way systemd reports them on
// D-Bus: booleans as "yes"/"no", anything else as is.
func normalizeTristate(v string) string {
	if b, err := parseBool(v); err == nil {
		if b {
			return "yes"
		}
		return "no"
	}
	return v
}

// ipKeywords are the names systemd accepts in IPAddressAllow=/IPAddressDeny=.
var ipKeywords = map[string][]netip.Prefix{
	"any":        {netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
	"localhost":  {netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
	"link-local": {netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("fe80::/64")},
	"multicast":  {netip.MustParsePrefix("224.0.0.0/4"), netip.MustParsePrefix("ff00::/8")},
}

// appendPrefixes parses one IPAddressAllow=/IPAddressDeny= value; an empty one resets the list.
func appendPrefixes(list []netip.Prefix, v string) ([]netip.Prefix, error) {
	if v == "" {
		return nil, nil
	}
	for _, f := range strings.Fields(v) {
		if kw, ok := ipKeywords[f]; ok {
			list = append(list, kw...)
			continue
		}
		p, err := parsePrefix(f)
		if err != nil {
			return nil, err
		}
		list = append(list, p)
	}
	return list, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// sameNetworks tells whether two prefix lists cover the same addresses, allowing systemd to have
// dropped a prefix another one covers: each prefix of either list lies inside one of the other.
func sameNetworks(a, b []netip.Prefix) bool {
	covered := func(p netip.Prefix, in []netip.Prefix) bool {
		for _, q := range in {
			if q.Addr().BitLen() == p.Addr().BitLen() && q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
				return true
			}
		}
		return false
	}
	for _, p := range a {
		if !covered(p, b) {
			return false
		}
	}
	for _, p := range b {
		if !covered(p, a) {
			return false
		}
	}
	return true
}

// allows tells whether an allowlist lets traffic to addr through.
func allows(allow []netip.Prefix, addr netip.Addr) bool {
	for _, p := range allow {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// compareProperties checks the effective properties of a service, as D-Bus reports them,
// against what the drop-in set. It returns one check per property, in propertyChecks order.
func compareProperties(want expected, got map[string]any) []Check {
	checks := make([]Check, 0, len(propertyChecks))
	add := func(name string, ok bool, wantText string, gotValue any) {
		c := Check{Name: name, Passed: ok, Message: name + "=" + wantText}
		if !ok {
			c.Message = fmt.Sprintf("systemd runs the unit with %s=%v, but %s was rendered", name, gotValue, wantText)
		}
		checks = append(checks, c)
	}
	str := func(k string) string { s, _ := got[k].(string); return s }
	flag := func(k string) (bool, bool) { b, ok := got[k].(bool); return b, ok }

	add(CheckUser, str(CheckUser) == want.user && want.user != "", want.user, quoteEmpty(str(CheckUser)))
	add(CheckProtectSystem, str(CheckProtectSystem) == want.protectSystem, want.protectSystem, quoteEmpty(str(CheckProtectSystem)))
	add(CheckProtectHome, str(CheckProtectHome) == want.protectHome, want.protectHome, quoteEmpty(str(CheckProtectHome)))
	for _, k := range []struct {
		name string
		want bool
	}{{CheckPrivateTmp, want.privateTmp}, {CheckNoNewPrivileges, want.noNewPrivileges}} {
		b, ok := flag(k.name)
		add(k.name, ok && b == k.want, yesNo(k.want), got[k.name])
	}
	caps, ok := got[CheckCapabilityBoundingSet].(uint64)
	add(CheckCapabilityBoundingSet, ok && caps == want.capabilities, fmt.Sprintf("%#x", want.capabilities), fmt.Sprintf("%#x", caps))
	for _, k := range []struct {
		name string
		want []netip.Prefix
	}{{CheckIPAddressDeny, want.deny}, {CheckIPAddressAllow, want.allow}} {
		have, err := dbusPrefixes(got[k.name])
		add(k.name, err == nil && sameNetworks(have, k.want), prefixText(k.want), prefixTextOrErr(have, err))
	}
	rw, _ := got[CheckReadWritePaths].([]string)
	add(CheckReadWritePaths, sameStrings(rw, want.readWrite), quoteEmpty(strings.Join(want.readWrite, " ")), quoteEmpty(strings.Join(rw, " ")))
	return checks
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func quoteEmpty(s string) string {
	if s == "" {
		return `""`
	}
	return s
}

func sameStrings(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

func prefixText(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return quoteEmpty(strings.Join(s, " "))
}

func prefixTextOrErr(ps []netip.Prefix, err error) string {
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return prefixText(ps)
}

// Address families in systemd's a(iayu) address lists.
const (
	afInet  = 2
	afInet6 = 10
)

// dbusPrefixes decodes an IPAddressAllow/IPAddressDeny property: an array of (family, address
// bytes, prefix length).
func dbusPrefixes(v any) ([]netip.Prefix, error) {
	items, ok := v.([][]any)
	if !ok {
		return nil, fmt.Errorf("unexpected type %T", v)
	}
	out := make([]netip.Prefix, 0, len(items))
	for _, it := range items {
		if len(it) != 3 {
			return nil, fmt.Errorf("entry of %d fields", len(it))
		}
		family, ok1 := it[0].(int32)
		raw, ok2 := it[1].([]byte)
		bits, ok3 := it[2].(uint32)
		if !ok1 || !ok2 || !ok3 {
			return nil, fmt.Errorf("entry of types %T %T %T", it[0], it[1], it[2])
		}
		a, ok := netip.AddrFromSlice(raw)
		if !ok || family == afInet && !a.Is4() || family == afInet6 && len(raw) != 16 || family != afInet && family != afInet6 {
			return nil, fmt.Errorf("address family %d with %d bytes", family, len(raw))
		}
		p, err := a.Prefix(int(bits))
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
