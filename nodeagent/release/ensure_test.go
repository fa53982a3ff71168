package release

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const testLabel = "1.4.2"

// newServer serves body at /release.tar.gz and counts the requests it gets.
func newServer(t *testing.T, tls bool, body []byte) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	hits := new(atomic.Int32)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if got := r.Header.Get("Accept-Encoding"); got != "identity" {
			t.Errorf("request asks for encoding %q; want identity", got)
		}
		if r.URL.Path != "/release.tar.gz" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/gzip")
		_, _ = w.Write(body)
	})
	var srv *httptest.Server
	if tls {
		srv = httptest.NewTLSServer(h)
	} else {
		srv = httptest.NewServer(h)
	}
	t.Cleanup(srv.Close)
	return srv, hits
}

// writeArtifact stores data as a file outside the releases folder (in the store's FileRoot, when
// dir is the base newStore returned) and returns its file:// URL.
func writeArtifact(t *testing.T, dir string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, "artifact.tar.gz")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return "file://" + p
}

func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	base := tempDir(t)
	return &Store{Dir: filepath.Join(base, "opt/agent/releases"), FileRoot: base}, base
}

// assertNoLeftovers fails if the releases folder holds anything but the given names.
func assertNoLeftovers(t *testing.T, st *Store, want ...string) {
	t.Helper()
	got := listDir(t, st.Dir)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("releases folder holds %v; want %v", got, want)
	}
}

// checkStaged asserts a successful Ensure and that a second one needs no download.
func checkStaged(t *testing.T, st *Store, a Artifact, hits func() int) {
	t.Helper()
	start := time.Now().Add(-2 * time.Second)
	p, err := st.Ensure(context.Background(), a)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	if p != st.Path(a) || p != filepath.Join(st.Dir, a.SHA256+"-"+a.Label) {
		t.Errorf("Ensure returned %s; want %s", p, st.Path(a))
	}
	checkValidTree(t, p)
	checkSafeTree(t, p)
	if fi, err := os.Stat(p); err != nil || fi.ModTime().Before(start) {
		t.Errorf("release folder mtime %v (%v); want the time of staging, for GC", fi.ModTime(), err)
	}
	assertNoLeftovers(t, st, filepath.Base(p))

	n := hits()
	p2, err := st.Ensure(context.Background(), a)
	if err != nil || p2 != p {
		t.Fatalf("second Ensure: %q, %v", p2, err)
	}
	if hits() != n {
		t.Errorf("second Ensure made %d more requests; want none", hits()-n)
	}
}

func TestEnsureHTTP(t *testing.T) {
	data := tgz(t, validEntries()...)
	srv, hits := newServer(t, false, data)
	st, _ := newStore(t) // nil HTTPClient: the default client
	a := Artifact{URL: srv.URL + "/release.tar.gz", SHA256: sha(data), Label: testLabel}
	checkStaged(t, st, a, func() int { return int(hits.Load()) })
	if hits.Load() != 1 {
		t.Errorf("%d requests; want 1", hits.Load())
	}
}

func TestEnsureHTTPS(t *testing.T) {
	data := tgz(t, validEntries()...)
	srv, hits := newServer(t, true, data)
	st, _ := newStore(t)
	st.HTTPClient = srv.Client()
	a := Artifact{URL: srv.URL + "/release.tar.gz", SHA256: sha(data), Label: testLabel}
	checkStaged(t, st, a, func() int { return int(hits.Load()) })
}

func TestEnsureFile(t *testing.T) {
	data := tgz(t, validEntries()...)
	st, base := newStore(t)
	a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
	checkStaged(t, st, a, func() int {
		// Once staged, the source may vanish: the second Ensure must not need it.
		if err := os.Remove(strings.TrimPrefix(a.URL, "file://")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		return 0
	})
}

func TestEnsureHostile(t *testing.T) {
	for _, c := range hostileCases(t) {
		t.Run(c.name, func(t *testing.T) {
			data := c.archive(t)
			st, base := newStore(t)
			st.Limits = c.lim
			a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
			p, err := st.Ensure(context.Background(), a)
			rej, ok := asRejected(err)
			if !ok {
				t.Fatalf("Ensure: %q, %v; want a RejectedError", p, err)
			}
			if rej.Reason != c.reason {
				t.Errorf("Reason %q (%v); want %q", rej.Reason, rej, c.reason)
			}
			if _, err := os.Lstat(st.Path(a)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the final path exists after a rejection: %v", err)
			}
			assertNoLeftovers(t, st)
			if got := listDir(t, base); !slices.Equal(got, []string{"artifact.tar.gz", "opt"}) {
				t.Errorf("the sandbox now holds %v", got)
			}
		})
	}
}

func TestEnsureDigestMismatch(t *testing.T) {
	st, base := newStore(t)

	// A release staged earlier must come through untouched.
	otherData := tgz(t, reg("other.txt", "other"))
	other := Artifact{URL: writeArtifact(t, base, otherData), SHA256: sha(otherData), Label: "1.0.0"}
	otherPath, err := st.Ensure(context.Background(), other)
	if err != nil {
		t.Fatal(err)
	}
	otherInfo, err := os.Stat(otherPath)
	if err != nil {
		t.Fatal(err)
	}

	served := tgz(t, reg("payload.txt", "must never be unpacked"))
	srv, hits := newServer(t, false, served)
	a := Artifact{URL: srv.URL + "/release.tar.gz", SHA256: sha([]byte("something else")), Label: testLabel}

	// Unpacking starts by clearing a stale .tmp tree, so a marker in one that survives the call
	// shows that no unpacking began.
	tmp := st.Path(a) + ".tmp"
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(tmp, "marker")
	if err := os.WriteFile(marker, []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}

	p, err := st.Ensure(context.Background(), a)
	rej, ok := asRejected(err)
	if !ok || rej.Reason != ReasonDigestMismatch {
		t.Fatalf("Ensure: %q, %v; want DigestMismatch", p, err)
	}
	if !strings.Contains(rej.Message, sha(served)) || !strings.Contains(rej.Message, a.SHA256) {
		t.Errorf("message %q does not give both digests", rej.Message)
	}
	if hits.Load() != 1 {
		t.Errorf("%d requests; want 1", hits.Load())
	}
	if got := listDir(t, tmp); !slices.Equal(got, []string{"marker"}) {
		t.Errorf("the stale .tmp tree now holds %v: unpacking began", got)
	}
	if _, err := os.Lstat(st.Path(a)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("final path: %v", err)
	}
	assertNoLeftovers(t, st, filepath.Base(otherPath), filepath.Base(tmp))
	if fi, err := os.Stat(otherPath); err != nil || !fi.ModTime().Equal(otherInfo.ModTime()) || fi.Mode() != otherInfo.Mode() {
		t.Errorf("the staged release changed: %v, %v", fi, err)
	}
	if got := listDir(t, otherPath); !slices.Equal(got, []string{"other.txt"}) {
		t.Errorf("the staged release now holds %v", got)
	}
}

func TestEnsureDownloadLimit(t *testing.T) {
	data := tgz(t, reg("a.txt", string(randomBytes(1, 2000))))
	limit := int64(len(data) - 1)
	chunked := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Flushing before the end drops Content-Length, so the limit must hold while copying.
		_, _ = w.Write(data[:10])
		w.(http.Flusher).Flush()
		_, _ = w.Write(data[10:])
	}))
	t.Cleanup(chunked.Close)
	sized, _ := newServer(t, false, data)

	for name, url := range map[string]func(base string) string{
		"http with length":    func(string) string { return sized.URL + "/release.tar.gz" },
		"http without length": func(string) string { return chunked.URL + "/release.tar.gz" },
		"file":                func(base string) string { return writeArtifact(t, base, data) },
	} {
		t.Run(name, func(t *testing.T) {
			st, base := newStore(t)
			st.Limits = Limits{MaxDownloadBytes: limit}
			a := Artifact{URL: url(base), SHA256: sha(data), Label: testLabel}
			_, err := st.Ensure(context.Background(), a)
			if rej, ok := asRejected(err); !ok || rej.Reason != ReasonTooLarge {
				t.Fatalf("Ensure: %v; want TooLarge", err)
			}
			assertNoLeftovers(t, st)

			st.Limits.MaxDownloadBytes = int64(len(data)) // the limit is inclusive
			if _, err := st.Ensure(context.Background(), a); err != nil {
				t.Fatalf("Ensure at the limit: %v", err)
			}
		})
	}
}

func TestEnsureHTTPStatus(t *testing.T) {
	for _, c := range []struct {
		code   int
		reason string // "" for a retryable plain error
	}{
		{http.StatusNotFound, ReasonNotFound},
		{http.StatusGone, ReasonNotFound},
		{http.StatusForbidden, ReasonBadArtifact},
		{http.StatusUnauthorized, ReasonBadArtifact},
		{http.StatusBadRequest, ReasonBadArtifact},
		{http.StatusTooManyRequests, ""},
		{http.StatusRequestTimeout, ""},
		{http.StatusInternalServerError, ""},
		{http.StatusBadGateway, ""},
		{http.StatusServiceUnavailable, ""},
		{http.StatusNotModified, ""},
	} {
		t.Run(strconv.Itoa(c.code), func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(c.code)
			}))
			defer srv.Close()
			st, _ := newStore(t)
			_, err := st.Ensure(context.Background(), Artifact{URL: srv.URL + "/r.tar.gz", SHA256: sha(nil), Label: testLabel})
			if err == nil {
				t.Fatal("Ensure succeeded")
			}
			rej, ok := asRejected(err)
			switch {
			case c.reason == "" && ok:
				t.Errorf("HTTP %d gave %v; want a plain, retryable error", c.code, err)
			case c.reason != "" && (!ok || rej.Reason != c.reason):
				t.Errorf("HTTP %d gave %v; want %s", c.code, err, c.reason)
			}
			if !strings.Contains(err.Error(), strconv.Itoa(c.code)) {
				t.Errorf("error %q does not give the status", err)
			}
			assertNoLeftovers(t, st)
		})
	}
}

func TestEnsureBadArtifact(t *testing.T) {
	st, base := newStore(t)
	good := sha([]byte("x"))
	folder := filepath.Join(base, "a-folder")
	if err := os.Mkdir(folder, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		a      Artifact
		reason string
	}{
		{"ftp scheme", Artifact{URL: "ftp://example.com/r.tar.gz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"no scheme", Artifact{URL: "/abs/r.tar.gz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"unparsable", Artifact{URL: "http://a b/%zz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"http without host", Artifact{URL: "http:///r.tar.gz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"remote file", Artifact{URL: "file://otherhost/r.tar.gz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"relative file", Artifact{URL: "file:r.tar.gz", SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"missing file", Artifact{URL: "file://" + filepath.Join(base, "nope.tar.gz"), SHA256: good, Label: testLabel}, ReasonNotFound},
		{"file is a folder", Artifact{URL: "file://" + folder, SHA256: good, Label: testLabel}, ReasonBadArtifact},
		{"uppercase sha", Artifact{URL: "file:///r.tar.gz", SHA256: strings.ToUpper(good), Label: testLabel}, ReasonBadArtifact},
		{"short sha", Artifact{URL: "file:///r.tar.gz", SHA256: good[:63], Label: testLabel}, ReasonBadArtifact},
		{"empty label", Artifact{URL: "file:///r.tar.gz", SHA256: good, Label: ""}, ReasonBadArtifact},
		{"label with slash", Artifact{URL: "file:///r.tar.gz", SHA256: good, Label: "../../etc"}, ReasonBadArtifact},
		{"label ending in .tmp", Artifact{URL: "file:///r.tar.gz", SHA256: good, Label: "1.0.tmp"}, ReasonBadArtifact},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := st.Ensure(context.Background(), c.a)
			if rej, ok := asRejected(err); !ok || rej.Reason != c.reason {
				t.Errorf("Ensure: %v; want %s", err, c.reason)
			}
			assertNoLeftovers(t, st)
		})
	}
}

func TestEnsureHidesURLPassword(t *testing.T) {
	st, _ := newStore(t)
	_, err := st.Ensure(context.Background(), Artifact{URL: "ftp://user:hunter2@example.com/r.tar.gz", SHA256: sha(nil), Label: testLabel})
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error %v; want one without the password", err)
	}
}

func TestEnsureCancelled(t *testing.T) {
	data := tgz(t, validEntries()...)
	srv, _ := newServer(t, false, data)
	st, base := newStore(t)
	for _, url := range []string{srv.URL + "/release.tar.gz", writeArtifact(t, base, data)} {
		_, err := st.Ensure(canceledCtx(), Artifact{URL: url, SHA256: sha(data), Label: testLabel})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s: %v; want context.Canceled", url, err)
		}
		if _, ok := asRejected(err); ok {
			t.Errorf("%s: cancellation reported as a rejection: %v", url, err)
		}
		assertNoLeftovers(t, st)
	}
}

func TestEnsureAfterCrash(t *testing.T) {
	data := tgz(t, validEntries()...)
	st, base := newStore(t)
	a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}

	// What a crash after unpacking half a tree leaves: a read-only .tmp tree, here with a link
	// out of it that removal must not follow, and an orphaned download.
	canary := filepath.Join(base, "canary")
	if err := os.MkdirAll(filepath.Join(canary, "keep"), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := st.Path(a) + ".tmp"
	if err := os.MkdirAll(filepath.Join(tmp, "lib/sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "lib/sub/half"), []byte("half"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(canary, filepath.Join(tmp, "lib/out")); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"lib/sub", "lib", "."} {
		if err := os.Chmod(filepath.Join(tmp, d), 0o555); err != nil {
			t.Fatal(err)
		}
	}
	stale := filepath.Join(st.Dir, ".download-123")
	if err := os.WriteFile(stale, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}

	p, err := st.Ensure(context.Background(), a)
	if err != nil {
		t.Fatalf("Ensure after a crash: %v", err)
	}
	checkValidTree(t, p)
	if _, err := os.Stat(filepath.Join(canary, "keep")); err != nil {
		t.Errorf("removing the stale tree reached outside it: %v", err)
	}
	// The orphaned download is GC's to remove.
	assertNoLeftovers(t, st, filepath.Base(p), filepath.Base(stale))
	removed, err := st.GC(1, nil)
	if err != nil || !slices.Equal(removed, []string{stale}) {
		t.Errorf("GC removed %v, %v; want the stale download", removed, err)
	}
}

func TestEnsureFinalPathIsAFile(t *testing.T) {
	data := tgz(t, reg("f", "x"))
	st, base := newStore(t)
	a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
	if err := os.MkdirAll(st.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st.Path(a), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Ensure(context.Background(), a); err == nil {
		t.Fatal("Ensure accepted a file in place of a release")
	} else if _, ok := asRejected(err); ok {
		t.Errorf("a broken host was blamed on the artifact: %v", err)
	}
}

// The store walks release trees by path (to sync and to remove them), which is safe only in a
// folder no one else can write: a releases folder that others may write, or that is a link,
// is refused before anything is staged or removed there.
func TestReleasesFolderMustBePrivate(t *testing.T) {
	data := tgz(t, validEntries()...)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string) string
	}{
		{"group-writable", func(t *testing.T, dir string) string {
			if err := os.Chmod(dir, 0o775); err != nil {
				t.Fatal(err)
			}
			return "writable by group or others"
		}},
		{"world-writable", func(t *testing.T, dir string) string {
			if err := os.Chmod(dir, 0o757); err != nil {
				t.Fatal(err)
			}
			return "writable by group or others"
		}},
		{"link", func(t *testing.T, dir string) string {
			real := dir + ".real"
			if err := os.Rename(dir, real); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(real, dir); err != nil {
				t.Fatal(err)
			}
			return "not a folder"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, base := newStore(t)
			if err := os.MkdirAll(st.Dir, 0o755); err != nil {
				t.Fatal(err)
			}
			want := tc.setup(t, st.Dir)
			a := Artifact{URL: writeArtifact(t, base, data), SHA256: sha(data), Label: testLabel}
			if _, err := st.Ensure(context.Background(), a); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Ensure: %v; want a refusal saying %q", err, want)
			}
			if _, err := st.GC(1, nil); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("GC: %v; want a refusal saying %q", err, want)
			}
		})
	}
}
