// Package poll waits in tests for something the system does asynchronously.
package poll

import (
	"testing"
	"time"
)

// Until checks cond every interval until it reports true, and fails the test with what and
// cond's last explanation if timeout passes first.
func Until(t testing.TB, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
