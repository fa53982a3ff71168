package microvm

import (
	"bytes"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm/guest"
)

// The host reads the guest init's report as the guest meant it, also when a stream was cut.
func TestReadReportOfTheGuestInit(t *testing.T) {
	const outputCap = 100
	big := bytes.Repeat([]byte("0123456789"), 20)
	for _, tc := range []struct {
		stdout, stderr []byte
		code           int
	}{
		{nil, nil, 0},
		{[]byte("hello\n"), []byte("oops\x00\xff"), 7},
		{big[:outputCap+1], big[:57], 255},
	} {
		serial := "[    0.1] kernel\r\n" + string(guest.Report(nonce, tc.stdout, tc.stderr, tc.code))
		rep, err := readReport(strings.NewReader(serial), nonce, outputCap, serialLimit(outputCap))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(rep.stdout, tc.stdout) || !bytes.Equal(rep.stderr, tc.stderr) || rep.exitCode != tc.code {
			t.Errorf("read %q / %q / %d, want %q / %q / %d", rep.stdout, rep.stderr, rep.exitCode, tc.stdout, tc.stderr, tc.code)
		}
	}
}
