// Package release stages release tarballs on a host: it downloads an artifact, checks its
// sha256 before anything is unpacked, extracts it with every path confined to the release's own
// folder, makes the tree read-only and moves it into place with one rename, so a folder named
// <sha256>-<label> always holds a complete, verified release.
package release

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
)

// Limits bound what one release may cost a host.
type Limits struct {
	MaxDownloadBytes int64 // size of the .tar.gz; default 512 MiB
	MaxUnpackedBytes int64 // sum of regular file sizes after unpacking; default 2 GiB
	MaxEntries       int   // tar entries; default 100000
	// MaxHeaderBytes bounds everything the tar reader consumes between entries: headers, PAX
	// and GNU extended headers (which are not entries of their own), padding and the trailer.
	// Default 256 MiB, about 2.6 KiB per entry at MaxEntries.
	MaxHeaderBytes int64
}

// DefaultLimits returns the limits used for every field left at zero.
func DefaultLimits() Limits {
	return Limits{
		MaxDownloadBytes: 512 << 20,
		MaxUnpackedBytes: 2 << 30,
		MaxEntries:       100000,
		MaxHeaderBytes:   256 << 20,
	}
}

// withDefaults fills each zero (or negative) field from DefaultLimits, so a caller can tighten
// one limit without restating the others.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxDownloadBytes <= 0 {
		l.MaxDownloadBytes = d.MaxDownloadBytes
	}
	if l.MaxUnpackedBytes <= 0 {
		l.MaxUnpackedBytes = d.MaxUnpackedBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = d.MaxEntries
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	return l
}

// Artifact is one release to stage.
type Artifact struct {
	URL    string // http://, https:// or file:// (file:///abs/path under Store.FileRoot on the agent's own filesystem)
	SHA256 string // 64 lowercase hex
	Label  string // e.g. "1.4.2"; validated with v1alpha1.ValidateReleaseLabel
}

// Store manages the releases folder of one host. Ensure and GC must not run concurrently on the
// same folder: GC removes the temporary files an Ensure in progress is using.
type Store struct {
	Dir        string       // the releases folder, e.g. <root>/opt/agent/releases
	Limits     Limits       // zero fields => DefaultLimits()
	HTTPClient *http.Client // nil => a client with sane timeouts
	// FileRoot is the only folder file:// URLs may name a file in, an absolute path on the
	// agent's own filesystem; empty turns file:// off. It should be writable by root only. Files
	// are opened beneath it without following any symlink, and only regular files are read.
	FileRoot string
	// FetchTimeout bounds one whole download, from connecting to the last byte; zero means
	// DefaultFetchTimeout.
	FetchTimeout time.Duration
	// StallWindow and StallMinBytes cut off a download that hangs or trickles: in every
	// StallWindow from the start of the request at least StallMinBytes more must arrive. Zero
	// means DefaultStallWindow and DefaultStallMinBytes.
	StallWindow   time.Duration
	StallMinBytes int64
}

// Defaults of a Store's download deadlines. A download at the default limit of 512 MiB needs
// about 300 KB/s to finish in time; below about 1 KiB/s it counts as stalled.
const (
	DefaultFetchTimeout  = 30 * time.Minute
	DefaultStallWindow   = time.Minute
	DefaultStallMinBytes = 64 << 10
)

// RejectedError means the artifact itself is bad (wrong digest, hostile or oversized tarball,
// bad URL scheme, bad label/sha): retrying will not help. Reason is a short CamelCase word, one
// of the Reason* constants; Message says what exactly, naming the offending entry for archive
// problems.
type RejectedError struct{ Reason, Message string }

func (e *RejectedError) Error() string { return e.Reason + ": " + e.Message }

// Reasons of a RejectedError.
const (
	// ReasonBadArtifact: the artifact description (URL, label, sha256) or the server's answer
	// cannot be used.
	ReasonBadArtifact = "BadArtifact"
	// ReasonNotFound: the server (or the local filesystem, for file://) has no such artifact.
	ReasonNotFound = "NotFound"
	// ReasonDigestMismatch: the downloaded bytes do not have the expected sha256.
	ReasonDigestMismatch = "DigestMismatch"
	// ReasonTooLarge: the download, the unpacked size or the number of entries is over a limit.
	ReasonTooLarge = "TooLarge"
	// ReasonUnsafeArchive: an entry would escape the release folder, is a device, carries
	// setuid/setgid bits, or otherwise could not be unpacked safely.
	ReasonUnsafeArchive = "UnsafeArchive"
	// ReasonBadArchive: the bytes are not a well-formed gzip-compressed tar stream.
	ReasonBadArchive = "BadArchive"
)

func reject(reason, format string, args ...any) error {
	return &RejectedError{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// tmpSuffix marks a tree being unpacked; labels may not end with it, or a staged release could
// be mistaken for another label's leftover.
const tmpSuffix = ".tmp"

// downloadPrefix starts the name of every temporary download inside Dir.
const downloadPrefix = ".download-"

// Path is where an artifact lives once staged: Dir/<sha256>-<label>. It does not validate a;
// Ensure does before using the path.
func (s *Store) Path(a Artifact) string {
	return filepath.Join(s.Dir, a.SHA256+"-"+a.Label)
}

func (s *Store) limits() Limits { return s.Limits.withDefaults() }

// defaultClient bounds each phase of a request; download bounds the whole of it.
var defaultClient = &http.Client{
	Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConns:          4,
		ForceAttemptHTTP2:     true,
		// The digest is of the bytes as served; never let the transport gunzip a .tar.gz.
		DisableCompression: true,
	},
}

func (s *Store) client() *http.Client {
	if s.HTTPClient != nil {
		return s.HTTPClient
	}
	return defaultClient
}

// Ensure stages a release and returns its path. If Dir/<sha>-<label> already exists it is
// returned at once without any download (only verified trees are ever renamed into place).
// Otherwise it downloads into a temp file inside Dir (name starting with ".download-"), counting
// bytes against MaxDownloadBytes and hashing while downloading; a wrong digest fails before
// anything is unpacked. It then unpacks into Dir/<sha>-<label>.tmp (removing any stale one
// first), makes the tree read-only (dirs 0555, files 0444, or 0555 when any exec bit was set),
// fsyncs it and renames it to Dir/<sha>-<label>. Temp files are removed on every path, and it is
// safe to call again after a crash at any point.
//
// A *RejectedError means the artifact is bad and retrying will not help; any other error (network,
// disk, canceled ctx) may go away on retry.
func (s *Store) Ensure(ctx context.Context, a Artifact) (string, error) {
	u, err := validate(a)
	if err != nil {
		return "", err
	}
	var rel string // a file URL's path inside FileRoot
	if u.Scheme == "file" {
		if rel, err = s.fileRel(u); err != nil {
			return "", err
		}
	}
	final := s.Path(a)
	switch fi, err := os.Lstat(final); {
	case err == nil && fi.IsDir():
		return final, nil
	case err == nil:
		return "", fmt.Errorf("release %s: %s exists and is not a folder", a.Label, final)
	case !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil { //nolint:gosec // release trees are read by every gateway (DESIGN host layout)
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	if err := s.private(); err != nil {
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}

	tmp, err := s.unpackBeside(ctx, a, u, rel, final)
	if err != nil {
		return "", err
	}
	if err := os.Rename(tmp, final); err != nil {
		_ = removeTree(tmp)
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	if err := syncPath(s.Dir); err != nil {
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	return final, nil
}

// unpackBeside downloads a's artifact, checks it and unpacks it into final's temporary sibling,
// which it returns for the caller to move into place; on failure nothing is left behind.
func (s *Store) unpackBeside(ctx context.Context, a Artifact, u *url.URL, rel, final string) (string, error) {
	archive, err := s.download(ctx, a, u, rel)
	if err != nil {
		return "", err
	}
	defer func() {
		archive.Close()
		os.Remove(archive.Name())
	}()
	tmp := final + tmpSuffix
	if err := removeTree(tmp); err != nil {
		return "", fmt.Errorf("release %s: removing stale %s: %w", a.Label, tmp, err)
	}
	if err := os.Mkdir(tmp, 0o755); err != nil { //nolint:gosec // release trees are read by every gateway (DESIGN host layout)
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	if err := s.unpack(ctx, archive, tmp); err != nil {
		// Best effort: a leftover is removed by the next Ensure or GC anyway.
		_ = removeTree(tmp)
		var rej *RejectedError
		if errors.As(err, &rej) {
			return "", err
		}
		return "", fmt.Errorf("release %s: %w", a.Label, err)
	}
	return tmp, nil
}

// unpack extracts the verified archive into tmp and makes the result durable.
func (s *Store) unpack(ctx context.Context, archive *os.File, tmp string) error {
	if _, err := archive.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if err := Extract(ctxReader{ctx, archive}, tmp, s.limits()); err != nil {
		return err
	}
	// GC ranks releases by the folder's mtime: make it the time of staging, not of the archive.
	now := time.Now()
	if err := os.Chtimes(tmp, now, now); err != nil {
		return err
	}
	return syncTree(tmp)
}

// validate checks everything about an artifact that can be checked without fetching it.
func validate(a Artifact) (*url.URL, error) {
	if err := v1.ValidateSHA256(a.SHA256); err != nil {
		return nil, reject(ReasonBadArtifact, "%v", err)
	}
	if err := v1.ValidateReleaseLabel(a.Label); err != nil {
		return nil, reject(ReasonBadArtifact, "%v", err)
	}
	if strings.HasSuffix(a.Label, tmpSuffix) {
		return nil, reject(ReasonBadArtifact, "release label %q must not end in %q, which marks unfinished trees", a.Label, tmpSuffix)
	}
	u, err := url.Parse(a.URL)
	if err != nil {
		// url.Parse's error repeats the URL, which may hold a password.
		return nil, reject(ReasonBadArtifact, "release URL is not a valid URL")
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return nil, reject(ReasonBadArtifact, "release URL %s has no host", u.Redacted())
		}
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, reject(ReasonBadArtifact, "release URL %s names host %q; file URLs must be local (file:///abs/path)", u.Redacted(), u.Host)
		}
		if u.Opaque != "" || !filepath.IsAbs(u.Path) {
			return nil, reject(ReasonBadArtifact, "release URL %s is not an absolute file URL (file:///abs/path)", u.Redacted())
		}
		if strings.IndexByte(u.Path, 0) >= 0 {
			return nil, reject(ReasonBadArtifact, "release URL %s has a NUL in its path", u.Redacted())
		}
	default:
		return nil, reject(ReasonBadArtifact, "release URL %s has scheme %q; want http, https or file", u.Redacted(), u.Scheme)
	}
	return u, nil
}

// download fetches the artifact into a temp file inside Dir and checks its digest. On success
// the file is open and positioned at its start; the caller removes it.
func (s *Store) download(ctx context.Context, a Artifact, u *url.URL, rel string) (*os.File, error) {
	timeout := orDefault(s.FetchTimeout, DefaultFetchTimeout)
	window := orDefault(s.StallWindow, DefaultStallWindow)
	minBytes := orDefault(s.StallMinBytes, DefaultStallMinBytes)
	fctx, stall := context.WithCancelCause(ctx)
	defer stall(nil)
	fctx, cancel := context.WithTimeoutCause(fctx, timeout, fmt.Errorf("the download did not finish within %v", timeout))
	defer cancel()
	got := new(atomic.Int64)
	stopWatch := watchProgress(got, window, minBytes, stall)
	defer stopWatch()
	// A cut-off download is the link's fault, not the artifact's: a plain error, retried.
	cutOff := func(err error) error {
		if ctx.Err() == nil && fctx.Err() != nil {
			return context.Cause(fctx)
		}
		return err
	}

	body, size, err := s.open(fctx, u, rel)
	if err != nil {
		var rej *RejectedError
		if errors.As(err, &rej) {
			return nil, err
		}
		return nil, fmt.Errorf("release %s: downloading %s: %w", a.Label, u.Redacted(), cutOff(err))
	}
	defer body.Close()
	limit := s.limits().MaxDownloadBytes
	if size > limit {
		return nil, reject(ReasonTooLarge, "%s is %d bytes; the limit is %d", u.Redacted(), size, limit)
	}

	f, err := os.CreateTemp(s.Dir, downloadPrefix+a.SHA256[:12]+"-*")
	if err != nil {
		return nil, fmt.Errorf("release %s: %w", a.Label, err)
	}
	keep := false
	defer func() {
		if !keep {
			f.Close()
			os.Remove(f.Name())
		}
	}()

	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(progressReader{body, got}, limit+1))
	stopWatch()
	if err != nil {
		return nil, fmt.Errorf("release %s: downloading %s: %w", a.Label, u.Redacted(), cutOff(err))
	}
	if n > limit {
		return nil, reject(ReasonTooLarge, "%s is more than %d bytes, the download limit", u.Redacted(), limit)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); sum != a.SHA256 {
		return nil, reject(ReasonDigestMismatch, "%s (%d bytes) has sha256 %s; want %s", u.Redacted(), n, sum, a.SHA256)
	}
	keep = true
	return f, nil
}

// open starts reading the artifact and returns its size when known in advance, else -1. rel is
// a file URL's path inside FileRoot.
func (s *Store) open(ctx context.Context, u *url.URL, rel string) (io.ReadCloser, int64, error) {
	if u.Scheme == "file" {
		return s.openFile(ctx, u, rel)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, 0, reject(ReasonBadArtifact, "release URL %s: %v", u.Redacted(), err)
	}
	// Asking for identity also stops a caller-supplied transport from gunzipping the body.
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := s.client().Do(req)
	if err != nil {
		return nil, 0, err
	}
	code := resp.StatusCode
	if code >= 200 && code <= 299 {
		return resp.Body, resp.ContentLength, nil
	}
	// Drain a little so the connection can be reused; the body itself is of no interest.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	switch {
	case code == http.StatusNotFound || code == http.StatusGone:
		return nil, 0, reject(ReasonNotFound, "%s: HTTP %s", u.Redacted(), resp.Status)
	// A client error is the artifact's fault, except a timeout or a rate limit: those may pass.
	case code >= 400 && code <= 499 && code != http.StatusRequestTimeout && code != http.StatusTooManyRequests:
		return nil, 0, reject(ReasonBadArtifact, "%s: HTTP %s", u.Redacted(), resp.Status)
	default:
		return nil, 0, fmt.Errorf("downloading %s: HTTP %s", u.Redacted(), resp.Status)
	}
}

// outsideFileRoot is the one answer for every file URL that is not under FileRoot. It depends
// on nothing but the configuration: whether such a path exists, what it is and what it holds
// must never reach an error or a status.
func (s *Store) outsideFileRoot() error {
	if s.FileRoot == "" {
		return reject(ReasonBadArtifact, "file URLs are turned off on this host (no release file folder is configured)")
	}
	return reject(ReasonBadArtifact, "file URLs must name a file under %s", s.FileRoot)
}

// fileRel returns the path a file URL names relative to FileRoot, judged on its text alone, so
// that nothing outside FileRoot is ever looked at.
func (s *Store) fileRel(u *url.URL) (string, error) {
	if s.FileRoot == "" {
		return "", s.outsideFileRoot()
	}
	if !filepath.IsAbs(s.FileRoot) {
		return "", fmt.Errorf("the release file folder %q is not an absolute path", s.FileRoot)
	}
	rel, err := filepath.Rel(filepath.Clean(s.FileRoot), filepath.Clean(u.Path))
	if err != nil || rel == "." || !filepath.IsLocal(rel) {
		return "", s.outsideFileRoot()
	}
	return rel, nil
}

// openFile opens FileRoot/rel for reading. The path is resolved by the kernel beneath FileRoot
// with no symlink followed anywhere, and O_NONBLOCK keeps a fifo from blocking the open; only a
// regular file is then read.
func (s *Store) openFile(ctx context.Context, u *url.URL, rel string) (io.ReadCloser, int64, error) {
	dir, err := unix.Open(s.FileRoot, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("opening the release file folder %s: %w", s.FileRoot, err)
	}
	defer func() { _ = unix.Close(dir) }()
	fd, err := unix.Openat2(dir, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOFOLLOW | unix.O_NOCTTY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	switch {
	case err == nil:
	case errors.Is(err, unix.ENOENT):
		return nil, 0, reject(ReasonNotFound, "%s does not exist", u.Path)
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.EXDEV):
		return nil, 0, reject(ReasonBadArtifact, "%s is a symlink or is reached through one; file URLs may not use symlinks", u.Path)
	case errors.Is(err, unix.ENOTDIR):
		return nil, 0, reject(ReasonNotFound, "%s does not exist (a part of its path is not a folder)", u.Path)
	case errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENODEV):
		return nil, 0, reject(ReasonBadArtifact, "%s is not a regular file", u.Path)
	case errors.Is(err, unix.ENOSYS):
		return nil, 0, fmt.Errorf("opening release %s: file URLs need openat2 (Linux 5.6 or later): %w", u.Path, err)
	default:
		return nil, 0, fmt.Errorf("opening release %s: %w", u.Path, err)
	}
	f := os.NewFile(uintptr(fd), u.Path)
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, 0, fmt.Errorf("opening release: %w", err)
	}
	// A fifo or device could block forever or never end.
	if !fi.Mode().IsRegular() {
		_ = f.Close()
		return nil, 0, reject(ReasonBadArtifact, "%s is not a regular file", u.Path)
	}
	return struct {
		io.Reader
		io.Closer
	}{ctxReader{ctx, f}, f}, fi.Size(), nil
}

func orDefault[T time.Duration | int64](v, d T) T {
	if v <= 0 {
		return d
	}
	return v
}

// watchProgress calls stall once fewer than minBytes more have been counted in got during one
// window, and returns a function that stops watching.
func watchProgress(got *atomic.Int64, window time.Duration, minBytes int64, stall context.CancelCauseFunc) func() {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(window)
		defer t.Stop()
		var last int64
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := got.Load()
				if n-last < minBytes {
					stall(fmt.Errorf("the download stalled: %d bytes arrived in the last %v; at least %d are needed", n-last, window, minBytes))
					return
				}
				last = n
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done) }) }
}

// progressReader adds the bytes read through it to n.
type progressReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c progressReader) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	c.n.Add(int64(k))
	return k, err
}

// ctxReader stops a long local copy or extraction when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// private checks that the releases folder is the agent's alone: a real folder (not a link),
// owned by the agent's user, that no group or other user may write. The walks by path below
// (syncTree, makeWritable) are safe only in such a folder, so this is checked, not assumed,
// before anything is staged or removed there.
func (s *Store) private() error {
	fi, err := os.Lstat(s.Dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("the releases folder %s is not a folder (a link?); refusing to stage or remove releases there", s.Dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("the releases folder %s is writable by group or others (mode %v); only the agent may write there", s.Dir, fi.Mode().Perm())
	case ok && int(st.Uid) != os.Geteuid():
		return fmt.Errorf("the releases folder %s is owned by uid %d, not the agent's (%d)", s.Dir, st.Uid, os.Geteuid())
	}
	return nil
}

// syncTree flushes every file and folder of a tree to disk, so the rename that publishes it can
// never expose a tree whose contents were lost in a crash. A walk by path is safe here: release
// trees live in the root-owned releases folder, which no gateway can write.
func syncTree(root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || d.Type().IsRegular() {
			return syncPath(p)
		}
		return nil
	})
}

func syncPath(p string) error {
	f, err := os.Open(p) //nolint:gosec // a path the store itself wrote
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// removeTree deletes a tree that may be read-only; a missing tree is not an error.
func removeTree(p string) error {
	makeWritable(p)
	err := os.RemoveAll(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

// makeWritable gives the owner write access to every folder of a tree so its entries can be
// removed. Symlinks are not followed; errors are left for the removal to report. Like syncTree,
// it walks only root-owned release trees, never a folder a gateway can write.
func makeWritable(root string) {
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			// WalkDir calls here before reading the folder, so this also makes it listable.
			_ = os.Chmod(p, 0o755) //nolint:gosec // a root-owned release tree about to be removed
		}
		return nil
	})
}
