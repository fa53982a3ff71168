// Package agentruntime builds release tarballs of a tiny Python agent runtime for tests. The
// runtime honors the gateway contract: `python -m agent_cli.main gateway run --replace` serves
// GET /status on $AGENT_HOME/run/status.sock with its pid, profile, release sha, PYTHONPATH and
// tools, plus what its sandbox allowed it to do (write /etc, read a sibling's home, connect out),
// and relays tool-run requests to the node agent's socket on POST /toolrun.
package agentruntime

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
)

//go:embed python
var sources embed.FS

// Options vary one build.
type Options struct {
	// Version is reported in /status and makes each build's sha256 distinct.
	Version string
	// Tools are the tool names the runtime reports as loaded.
	Tools []string
	// CrashAtStart builds a broken release: the runtime exits 3 as soon as it starts.
	CrashAtStart bool
	// CrashAfter builds a release that starts, answers, and exits 4 after this long.
	CrashAfter time.Duration
	// Hostile makes the runtime attack the agent that runs it (see the Hostile* constants).
	Hostile string
	// SwapTarget is where the HostileSwap runtime points its symlink.
	SwapTarget string
	// UnsafeEntry adds a file that climbs out of the release folder (../escaped): an archive
	// the agent must refuse to unpack.
	UnsafeEntry bool
}

// Hostile runtimes: a gateway that runs someone's code and turns on its host.
const (
	// HostileMute accepts on its status socket and never answers.
	HostileMute = "mute"
	// HostileSwap serves normally while it swaps $AGENT_HOME/sub with a symlink to SwapTarget
	// (renameat2 RENAME_EXCHANGE) as fast as it can, for root to follow.
	HostileSwap = "swap"
	// HostileForge serves normally and, as soon as its profile's `current` moves, makes itself
	// look like the new release: it rewrites its own environment block, moves into the new
	// release folder and reports the new sha on its status endpoint.
	HostileForge = "forge"
)

// Tarball is one built release.
type Tarball struct {
	Options
	Data   []byte
	SHA256 string
	// Label is a release label derived from the version.
	Label string
}

// Build makes a .tar.gz of the runtime. The same options always give the same bytes.
func Build(o Options) (*Tarball, error) {
	if o.Tools == nil {
		o.Tools = []string{"search", "summarize"}
	}
	release := map[string]any{"version": o.Version, "tools": o.Tools, "crash_at_start": o.CrashAtStart}
	if o.Hostile != "" {
		release["hostile"] = o.Hostile
		release["swap_target"] = o.SwapTarget
	}
	if o.CrashAfter > 0 {
		release["crash_after"] = o.CrashAfter.Seconds()
	}
	info, err := json.Marshal(release)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{"agent_cli/release.json": info}
	if o.UnsafeEntry {
		files["../escaped"] = []byte("written outside the release folder\n")
	}
	err = fs.WalkDir(sources, "python", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := sources.ReadFile(p)
		files[p[len("python/"):]] = b
		return err
	})
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)

	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	mtime := time.Unix(1700000000, 0)
	for _, dir := range []string{"agent_cli/", "gateways/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: mtime}); err != nil {
			return nil, err
		}
	}
	for _, n := range names {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(files[n])), ModTime: mtime}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(buf.Bytes())
	return &Tarball{Options: o, Data: buf.Bytes(), SHA256: hex.EncodeToString(sum[:]), Label: o.Version}, nil
}

// MustBuild is Build for tests.
func MustBuild(t testing.TB, o Options) *Tarball {
	t.Helper()
	tb, err := Build(o)
	if err != nil {
		t.Fatal(err)
	}
	return tb
}

// Server serves tarballs over HTTP and counts the requests for each.
type Server struct {
	*httptest.Server
	mu       sync.Mutex
	files    map[string][]byte
	requests map[string]int
}

// Serve starts an HTTP server for release tarballs, closed at cleanup.
func Serve(t testing.TB) *Server {
	s := &Server{files: map[string][]byte{}, requests: map[string]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		data, ok := s.files[r.URL.Path]
		s.requests[r.URL.Path]++
		s.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(data)
	}))
	t.Cleanup(s.Close)
	return s
}

// Add publishes data at /<name> and returns its URL.
func (s *Server) Add(name string, data []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files["/"+name] = data
	return s.URL + "/" + name
}

// Requests returns how often /<name> was fetched.
func (s *Server) Requests(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests["/"+name]
}

// Status is what the runtime's status endpoint reports.
type Status struct {
	PID         int               `json:"pid"`
	Profile     string            `json:"profile"`
	ReleaseSHA  string            `json:"release_sha"`
	PythonPath  string            `json:"pythonpath"`
	SysPath     []string          `json:"sys_path"`
	Version     string            `json:"version"`
	Tools       []string          `json:"tools"`
	ReleaseRoot string            `json:"release_root"`
	Cwd         string            `json:"cwd"`
	UID         int               `json:"uid"`
	Mode        string            `json:"mode"`
	Probes      map[string]string `json:"probes"`
	// Read has the sha256 of each variable ("env:NAME") and home file ("file:path") the
	// gateway's REPORT_SHA256 names, as the gateway read them.
	Read map[string]string `json:"read"`
}

// GetStatus asks a runtime for its status over its unix socket (a path the caller can reach),
// with the node agent's own client.
func GetStatus(ctx context.Context, socket string) (*Status, error) {
	reply, err := proof.ReadStatusSocket(ctx, socket)
	if err != nil {
		return nil, err
	}
	var st Status
	return &st, json.Unmarshal(reply.Raw, &st)
}

// SampleDir and SampleFile are where config/samples/release.yaml expects the runtime's 1.0.0
// build on each host.
const (
	SampleDir  = "/var/lib/gateway-operator/releases"
	SampleFile = "agent-runtime-1.0.0.tar.gz"
)

// PlaceSample writes the 1.0.0 build where the sample Release points.
func PlaceSample() error {
	tb, err := Build(Options{Version: "1.0.0"})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(SampleDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(SampleDir, SampleFile), tb.Data, 0o644)
}

// ToolRunReply is what a runtime relays from the node agent's tool-run socket.
type ToolRunReply struct {
	microvm.Result
	// ConnectError is set when the runtime could not connect to the socket at all.
	ConnectError string `json:"connect_error"`
}

// ToolRun makes a running gateway send req to a tool-run socket (its own when target is "",
// else the path target inside its sandbox) and returns what came back. statusSocket is the
// gateway's status socket as the caller reaches it.
func ToolRun(ctx context.Context, statusSocket, target string, req microvm.Request) (*ToolRunReply, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return proof.DialUnix(ctx, statusSocket)
	}}
	defer tr.CloseIdleConnections()
	u := "http://gateway/toolrun"
	if target != "" {
		u += "?socket=" + url.QueryEscape(target)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(hreq)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("gateway answered %s: %s", resp.Status, raw)
	}
	var reply ToolRunReply
	if err := json.Unmarshal(raw, &reply); err != nil {
		return nil, fmt.Errorf("gateway reply %q: %w", raw, err)
	}
	return &reply, nil
}
