package controllers

import (
	"strings"
	"testing"
)

func TestWaitingMessage(t *testing.T) {
	for _, tc := range []struct {
		w          hostsWaitedFor
		want, none []string
	}{
		{hostsWaitedFor{reachable: []string{"a", "b"}}, []string{"2 host(s) removing the unit: a, b"}, []string{"kubectl", "unreachable"}},
		{hostsWaitedFor{gone: []string{"g"}}, []string{"1 deleted host(s) being released: g"}, []string{"kubectl"}},
		{hostsWaitedFor{reachable: []string{"a"}, unreachable: []string{"z", "u"}},
			[]string{"removing the unit: a", "2 unreachable host(s)", "u, z", "kubectl delete gatewayhost u"}, nil},
	} {
		msg := tc.w.message()
		for _, s := range tc.want {
			if !strings.Contains(msg, s) {
				t.Errorf("%q lacks %q", msg, s)
			}
		}
		for _, s := range tc.none {
			if strings.Contains(msg, s) {
				t.Errorf("%q has %q", msg, s)
			}
		}
	}
}
