package bootstrap

import (
	"context"
	"crypto/x509"
	"strings"
	"testing"
	"time"
)

// TestRenewAt: a certificate is renewed after two thirds of its lifetime.
func TestRenewAt(t *testing.T) {
	nb := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c := &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(300 * 24 * time.Hour)}
	if got, want := RenewAt(c), nb.Add(200*24*time.Hour); !got.Equal(want) {
		t.Fatalf("RenewAt = %v, want %v", got, want)
	}
}

// TestBootstrapRefusesBadInput: nothing is sent for a malformed token, host or server.
func TestBootstrapRefusesBadInput(t *testing.T) {
	ok := Options{Token: "abcdef.0123456789abcdef", Server: "https://127.0.0.1:6443", CAData: []byte("x"), Host: "h1", Kubeconfig: t.TempDir() + "/k"}
	for _, tc := range []struct {
		name string
		f    func(*Options)
		want string
	}{
		{"token", func(o *Options) { o.Token = "abcdef:0123456789abcdef" }, "not a bootstrap token"},
		{"host", func(o *Options) { o.Host = "../etc" }, "not a DNS label"},
		{"server", func(o *Options) { o.Server = "http://127.0.0.1:6443" }, "not an https:// URL"},
		{"ca", func(o *Options) { o.CAData = nil }, "no CA"},
	} {
		o := ok
		tc.f(&o)
		if err := Bootstrap(context.Background(), o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
