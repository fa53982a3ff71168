package drift

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// startWatcher runs a Watcher over a fresh root folder with the agent's layout for profile core.
func startWatcher(t *testing.T) (string, chan Hint) {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"opt/agent/gateways/core", "opt/agent/_lib", "opt/agent/releases/r1/pkg", "etc/systemd/system", "run/systemd/system"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "opt/agent/gateways/core/env"), []byte("A=1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	hints := make(chan Hint, 100)
	w := &Watcher{Host: layout.Host{Root: root}, Hint: func(h Hint) { hints <- h }, Log: testr.New(t)}
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	w.Watch("core", []string{"/opt/agent/releases/r1"})
	return root, hints
}

// next waits for a hint about one of whats, ignoring others; it fails the test after 10 s.
func next(t *testing.T, hints chan Hint, kind Kind, whats ...string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case h := <-hints:
			t.Logf("hint %s %s", h.Kind, h.What)
			if h.Kind == kind && slices.Contains(whats, h.What) && h.Profile == "core" {
				return
			}
		case <-timeout:
			t.Fatalf("no %s hint for %s", kind, whats)
		}
	}
}

// none checks that no hint arrived for anything done before it: it makes a watched change and
// waits for its hint (the watcher handles events in order).
func none(t *testing.T, root string, hints chan Hint) {
	t.Helper()
	drain(t, root, hints, true)
}

// drain waits for a marker hint, failing on any other hint before it when strict.
func drain(t *testing.T, root string, hints chan Hint, strict bool) {
	t.Helper()
	// A marker change that is watched: once its hint arrives, earlier events were handled.
	if err := os.WriteFile(filepath.Join(root, "opt/agent/_lib/launch"), []byte("x"), 0o755); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	for {
		h := <-hints
		if h.Kind == KindLauncher {
			return
		}
		if strict {
			t.Errorf("unexpected hint %+v", h)
		}
	}
}

func TestWatcherSeesTheFilesItWatches(t *testing.T) {
	root, hints := startWatcher(t)
	on := func(p string) string { return filepath.Join(root, p) }
	if err := os.WriteFile(on("opt/agent/gateways/core/env"), []byte("A=2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindEnv, "/opt/agent/gateways/core/env")
	if err := os.Symlink("../../releases/r2", on("opt/agent/gateways/core/current")); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindLink, "/opt/agent/gateways/core/current")
	// A drop-in folder that did not exist: its creation is seen, then a file in it.
	if err := os.Mkdir(on("etc/systemd/system/agent-gateway@core.service.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindDropIn, "/etc/systemd/system/agent-gateway@core.service.d")
	if err := os.WriteFile(on("etc/systemd/system/agent-gateway@core.service.d/90-x.conf"), []byte("[Service]\n"), 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	next(t, hints, KindDropIn, "/etc/systemd/system/agent-gateway@core.service.d/90-x.conf")
	// Folders below missing ones: /run/systemd/system.control/ and the template's folder in it.
	if err := os.MkdirAll(on("run/systemd/system.control/agent-gateway@.service.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindDropIn, "/run/systemd/system.control")
	if err := os.WriteFile(on("run/systemd/system.control/agent-gateway@.service.d/x.conf"), nil, 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	// The folder may be watched only after the file was written in it: a new watch is a hint too.
	next(t, hints, KindDropIn, "/run/systemd/system.control/agent-gateway@.service.d/x.conf", "/run/systemd/system.control/agent-gateway@.service.d")
	if err := os.WriteFile(on("etc/systemd/system/agent-gateway@.service"), []byte("[Unit]\n"), 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	next(t, hints, KindUnit, "/etc/systemd/system/agent-gateway@.service")
	if err := os.WriteFile(on("opt/agent/releases/r1/pkg/mod.py"), nil, 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	next(t, hints, KindRelease, "/opt/agent/releases/r1/pkg/mod.py")
}

func TestWatcherFollowsNoSymlinkAndWatchesOnlyRootsFolders(t *testing.T) {
	root, hints := startWatcher(t)
	on := func(p string) string { return filepath.Join(root, p) }
	// A drop-in folder that is a symlink to a folder elsewhere: never watched through the link.
	elsewhere := t.TempDir()
	if err := os.Symlink(elsewhere, on("etc/systemd/system/agent-gateway@core.service.d")); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindDropIn, "/etc/systemd/system/agent-gateway@core.service.d")
	if err := os.WriteFile(filepath.Join(elsewhere, "x.conf"), nil, 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	// A folder someone else owns is not watched either.
	if err := os.Mkdir(on("etc/systemd/system/service.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	next(t, hints, KindDropIn, "/etc/systemd/system/service.d")
	if err := os.Chown(on("etc/systemd/system/service.d"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	// The chown itself is seen; let the watcher settle on it.
	drain(t, root, hints, false)
	if err := os.WriteFile(on("etc/systemd/system/service.d/x.conf"), nil, 0o644); err != nil { //nolint:gosec // a test file
		t.Fatal(err)
	}
	none(t, root, hints)
}
