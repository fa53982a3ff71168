package release

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// trickleServer answers with a large Content-Length and then sends chunk bytes every interval
// until the client goes away.
func trickleServer(t *testing.T, chunk int, interval time.Duration) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(64<<20))
		w.WriteHeader(http.StatusOK)
		buf := make([]byte, chunk)
		for {
			if _, err := w.Write(buf); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(interval):
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// muteServer accepts connections and never sends a byte. The returned function closes every
// connection it holds.
func muteServer(t *testing.T) (string, func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	closeAll := func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
		conns = nil
	}
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		closeAll()
	})
	return "http://" + ln.Addr().String(), closeAll
}

// checkCutOff asserts a download that was cut off: a plain (retried) error saying why, and
// nothing left in the releases folder.
func checkCutOff(t *testing.T, st *Store, err error, says string) {
	t.Helper()
	if err == nil {
		t.Fatal("Ensure succeeded")
	}
	if _, ok := asRejected(err); ok {
		t.Errorf("a slow link was blamed on the artifact: %v", err)
	}
	if !strings.Contains(err.Error(), says) {
		t.Errorf("error %q does not say %q", err, says)
	}
	t.Log(err)
	assertNoLeftovers(t, st)
}

func TestEnsureStalledDownload(t *testing.T) {
	trickle := trickleServer(t, 1, 20*time.Millisecond)
	mute, closeMute := muteServer(t)
	for _, c := range []struct {
		name, url string
		unblock   func()
	}{
		{"one byte at a time", trickle.URL + "/release.tar.gz", trickle.CloseClientConnections},
		{"never answers", mute + "/release.tar.gz", closeMute},
	} {
		t.Run(c.name, func(t *testing.T) {
			st, _ := newStore(t)
			st.StallWindow, st.StallMinBytes = 300*time.Millisecond, 4096
			start := time.Now()
			err := ensureBounded(t, st, Artifact{URL: c.url, SHA256: sha(nil), Label: testLabel}, c.unblock)
			t.Logf("cut off after %v", time.Since(start).Round(time.Millisecond))
			checkCutOff(t, st, err, "stalled")
		})
	}
}

func TestEnsureFetchTimeout(t *testing.T) {
	// Fast enough never to stall, too long to finish.
	srv := trickleServer(t, 8192, 10*time.Millisecond)
	st, _ := newStore(t)
	st.FetchTimeout, st.StallWindow, st.StallMinBytes = time.Second, 200*time.Millisecond, 1024
	err := ensureBounded(t, st, Artifact{URL: srv.URL + "/release.tar.gz", SHA256: sha(nil), Label: testLabel}, srv.CloseClientConnections)
	checkCutOff(t, st, err, "did not finish within 1s")
}

// TestEnsureSlowDownloadFinishes checks that a slow download that keeps making progress is
// left alone, however many windows it takes.
func TestEnsureSlowDownloadFinishes(t *testing.T) {
	data := tgz(t, reg("blob", string(randomBytes(7, 8192)))) // incompressible: 2.6 s at 3.2 KB/s
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for rest := data; len(rest) > 0; {
			n := min(len(rest), 64)
			if _, err := w.Write(rest[:n]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			rest = rest[n:]
			time.Sleep(20 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	st, _ := newStore(t)
	st.StallWindow, st.StallMinBytes = 500*time.Millisecond, 64
	if _, err := st.Ensure(context.Background(), Artifact{URL: srv.URL + "/r.tar.gz", SHA256: sha(data), Label: testLabel}); err != nil {
		t.Fatalf("Ensure of a slow but steady download (%d bytes over about %v): %v", len(data), time.Duration(len(data)/64)*20*time.Millisecond, err)
	}
}

// TestEnsureCancelledWhileStalled checks that the caller's own cancellation is still reported
// as such, not as a stall.
func TestEnsureCancelledWhileStalled(t *testing.T) {
	mute, _ := muteServer(t)
	st, _ := newStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := st.Ensure(ctx, Artifact{URL: mute + "/r.tar.gz", SHA256: sha(nil), Label: testLabel})
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "stalled") {
		t.Fatalf("Ensure: %v; want the caller's deadline", err)
	}
	assertNoLeftovers(t, st)
}
