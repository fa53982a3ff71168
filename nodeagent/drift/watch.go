package drift

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
)

// Watcher sends a Hint whenever something a watched profile depends on may have changed: an
// inotify event in a folder the agent owns or systemd reads the profile's unit from, or a D-Bus
// signal about the profile's unit. It watches folders only, each opened beneath the host's root
// without following any symlink and only when root owns it and no one else can write it: a
// profile's home and logs are never watched, and a watch is added through the folder's file
// descriptor (/proc/self/fd/<n>), so nothing is resolved by path twice.
type Watcher struct {
	// Host is the host's root prefix.
	Host layout.Host
	// Systemd, when set, is the bus whose unit signals are watched.
	Systemd *systemd.Conn
	// Hint receives every hint, from the watcher's goroutines. It must not block for long.
	Hint func(Hint)
	// Log receives watches that could not be added.
	Log logr.Logger
	// MaxReleaseDirs bounds the folders watched in one release tree (inotify watches are a
	// per-user kernel budget); 2000 when zero.
	MaxReleaseDirs int

	mu       sync.Mutex
	root     int // O_PATH fd of Host.Root
	inotify  *os.File
	profiles map[string][]string // watched profile -> release folders it runs (host paths)
	watches  map[int32]*watch
	byDir    map[string]int32
}

// target is what an event on a name (or on any name) in a watched folder concerns.
type target struct {
	kind       Kind
	profile    string // empty: every profile
	release    string // a release folder: the profiles running it
	structural bool   // folders come or go: compute the watches again
}

type watch struct {
	dir   string
	all   *target
	names map[string]target
}

// inotifyMask is every change to a folder's entries or to the folder itself.
const inotifyMask = unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_ATTRIB | unix.IN_CREATE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR | unix.IN_EXCL_UNLINK

// Start opens the inotify instance; Run then delivers hints until its context ends.
func (w *Watcher) Start() error {
	root, err := unix.Open(w.Host.Root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: w.Host.Root, Err: err}
	}
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		unix.Close(root)
		return os.NewSyscallError("inotify_init1", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	// Non-blocking: reads wait in Go's poller, and Close ends a pending read.
	w.root, w.inotify = root, os.NewFile(uintptr(fd), "inotify")
	w.profiles, w.watches, w.byDir = map[string][]string{}, map[int32]*watch{}, map[string]int32{}
	return nil
}

// Run delivers hints until ctx ends, then releases the inotify instance.
func (w *Watcher) Run(ctx context.Context) error {
	if w.Systemd != nil {
		go w.units(ctx)
	}
	go func() {
		<-ctx.Done()
		w.mu.Lock()
		defer w.mu.Unlock()
		w.inotify.Close()
		unix.Close(w.root)
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := w.inotify.Read(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil //nolint:nilerr // closed on purpose when ctx ended
			}
			return err
		}
		w.events(buf[:n])
	}
}

// Watch starts (or updates) the watches for a profile that runs the given release folders
// (paths inside the host: its `current` and `last-good`).
func (w *Watcher) Watch(profile string, releases []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.profiles == nil {
		return
	}
	w.profiles[profile] = releases
	w.resync()
}

// Forget stops watching a profile.
func (w *Watcher) Forget(profile string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.profiles == nil {
		return
	}
	delete(w.profiles, profile)
	w.resync()
}

// Watched reports how many folders are watched (for tests and the benchmark).
func (w *Watcher) Watched() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.watches)
}

// desired computes every folder to watch and what its events concern.
func (w *Watcher) desired() map[string]*watch {
	want := map[string]*watch{}
	add := func(dir string, name string, t target) {
		wt := want[dir]
		if wt == nil {
			wt = &watch{dir: dir, names: map[string]target{}}
			want[dir] = wt
		}
		if name == "" {
			wt.all = &t
			return
		}
		if old, ok := wt.names[name]; ok && old.profile != t.profile {
			t.profile = "" // a name two profiles care about concerns both
		}
		wt.names[name] = t
	}
	all := func(dir string, t target) { add(dir, "", t) }
	add(path.Dir(layout.LauncherPath), path.Base(layout.LauncherPath), target{kind: KindLauncher})
	releases := map[string]bool{}
	for name, rels := range w.profiles {
		p, err := layout.ForProfile(name)
		if err != nil {
			continue
		}
		for _, f := range UnitFiles(p) {
			prof := name
			if path.Base(f) == layout.TemplateUnit {
				prof = ""
			}
			add(path.Dir(f), path.Base(f), target{kind: KindUnit, profile: prof})
		}
		for _, d := range DropInDirs(p) {
			prof := ""
			if path.Base(d) == p.Unit+".d" {
				prof = name
			}
			add(path.Dir(d), path.Base(d), target{kind: KindDropIn, profile: prof, structural: true})
			all(d, target{kind: KindDropIn, profile: prof})
		}
		for _, n := range []string{path.Base(p.Env), path.Base(p.Current), "last-good"} {
			k := KindLink
			if n == path.Base(p.Env) {
				k = KindEnv
			}
			add(p.Dir, n, target{kind: k, profile: name})
		}
		for _, r := range rels {
			releases[r] = true
		}
	}
	for r := range releases {
		add(path.Dir(r), path.Base(r), target{kind: KindRelease, release: r, structural: true})
		dirs := 0
		limit := w.MaxReleaseDirs
		if limit <= 0 {
			limit = 2000
		}
		// WalkDir never follows a symlink; release trees are root's and read-only.
		_ = filepath.WalkDir(w.Host.On(r), func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil //nolint:nilerr // a folder that cannot be read is not watched
			}
			if dirs++; dirs > limit {
				return fs.SkipAll
			}
			rel, _ := filepath.Rel(w.Host.On(r), p)
			all(path.Join(r, filepath.ToSlash(rel)), target{kind: KindRelease, release: r, structural: true})
			return nil
		})
	}
	return want
}

// resync syncs until no watch is added: a folder created between sync's look and its new watch
// on the parent would otherwise go unseen.
func (w *Watcher) resync() []*watch {
	var added []*watch
	for range 8 {
		a := w.sync()
		if len(a) == 0 {
			break
		}
		added = append(added, a...)
	}
	return added
}

// sync adds and removes watches to match desired. A folder that does not exist is replaced by
// a watch on its nearest existing ancestor for the missing name, so its creation is seen. It
// returns the watches it added: what they hold may have changed before they were added.
func (w *Watcher) sync() []*watch {
	final := map[string]*watch{}
	merge := func(wt *watch) {
		have := final[wt.dir]
		if have == nil {
			have = &watch{dir: wt.dir, names: map[string]target{}}
			final[wt.dir] = have
		}
		if wt.all != nil {
			have.all = wt.all
		}
		for n, t := range wt.names {
			have.names[n] = t
		}
	}
	exists := func(dir string) bool {
		fd, err := w.openDir(dir)
		if err == nil {
			unix.Close(fd)
		}
		return err == nil
	}
	for dir, wt := range w.desired() {
		if exists(dir) {
			merge(wt)
			continue
		}
		name, up := path.Base(dir), path.Dir(dir)
		for up != "/" && !exists(up) {
			name, up = path.Base(up), path.Dir(up)
		}
		kind := KindDropIn
		if wt.all != nil {
			kind = wt.all.kind
		}
		merge(&watch{dir: up, names: map[string]target{name: {kind: kind, structural: true}}})
	}
	for dir, wd := range w.byDir {
		if final[dir] == nil {
			_, _ = unix.InotifyRmWatch(int(w.inotify.Fd()), uint32(wd)) //nolint:gosec // a watch descriptor the kernel gave
			delete(w.byDir, dir)
			delete(w.watches, wd)
		}
	}
	var added []*watch
	for dir, wt := range final {
		if wd, ok := w.byDir[dir]; ok {
			w.watches[wd] = wt
			continue
		}
		wd, err := w.addWatch(dir)
		if err != nil {
			w.Log.V(1).Info("not watching", "folder", dir, "reason", err.Error())
			continue
		}
		w.byDir[dir] = wd
		w.watches[wd] = wt
		added = append(added, wt)
	}
	return added
}

// openDir opens a folder inside the host beneath the root, following no symlink, and checks
// that root owns it and no one else may write it.
func (w *Watcher) openDir(dir string) (int, error) {
	rel := strings.TrimPrefix(path.Clean(dir), "/")
	if rel == "" {
		rel = "."
	}
	fd, err := unix.Openat2(w.root, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if st.Uid != 0 || st.Mode&0o022 != 0 {
		unix.Close(fd)
		return -1, errors.New("not a folder only root can write")
	}
	return fd, nil
}

// addWatch watches a folder through its file descriptor.
func (w *Watcher) addWatch(dir string) (int32, error) {
	fd, err := w.openDir(dir)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	wd, err := unix.InotifyAddWatch(int(w.inotify.Fd()), "/proc/self/fd/"+itoa(fd), inotifyMask)
	if err != nil {
		return 0, os.NewSyscallError("inotify_add_watch", err)
	}
	return int32(wd), nil //nolint:gosec // watch descriptors are small positive ints
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}

// events turns a buffer of inotify events into hints.
func (w *Watcher) events(buf []byte) {
	now := time.Now()
	w.mu.Lock()
	var hints []Hint
	resync := false
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off])) //nolint:gosec // the kernel's event layout
		nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
		off += unix.SizeofInotifyEvent + int(ev.Len)
		name := strings.TrimRight(string(nameBytes), "\x00")
		if ev.Mask&unix.IN_Q_OVERFLOW != 0 {
			// Events were lost: everything may have changed.
			hints = append(hints, w.expand(target{kind: KindLoaded}, "inotify queue overflow", now)...)
			resync = true
			continue
		}
		wt := w.watches[ev.Wd]
		if wt == nil {
			continue
		}
		if ev.Mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0 {
			if ev.Mask&unix.IN_IGNORED != 0 {
				delete(w.watches, ev.Wd)
				delete(w.byDir, wt.dir)
			}
			if wt.all != nil {
				hints = append(hints, w.expand(*wt.all, wt.dir, now)...)
			}
			resync = true
			continue
		}
		t, ok := wt.names[name]
		if !ok && wt.all == nil {
			continue
		}
		if !ok {
			t = *wt.all
		}
		hints = append(hints, w.expand(t, path.Join(wt.dir, name), now)...)
		if t.structural || ev.Mask&unix.IN_ISDIR != 0 {
			resync = true
		}
	}
	if resync {
		for _, wt := range w.resync() {
			if wt.all != nil {
				hints = append(hints, w.expand(*wt.all, wt.dir, now)...)
			}
		}
	}
	w.mu.Unlock()
	for _, h := range hints {
		w.Hint(h)
	}
}

// expand turns a target into one hint per profile it concerns. Called with w.mu held.
func (w *Watcher) expand(t target, what string, at time.Time) []Hint {
	var hints []Hint
	for name, rels := range w.profiles {
		switch {
		case t.release != "":
			for _, r := range rels {
				if r == t.release {
					hints = append(hints, Hint{Profile: name, Kind: t.kind, What: what, At: at})
					break
				}
			}
		case t.profile == "" || t.profile == name:
			hints = append(hints, Hint{Profile: name, Kind: t.kind, What: what, At: at})
		}
	}
	return hints
}

// units turns systemd's signals into hints.
func (w *Watcher) units(ctx context.Context) {
	ch := make(chan systemd.UnitSignal, 64)
	go w.Systemd.WatchUnits(ctx, "agent-gateway@", ch)
	for {
		var s systemd.UnitSignal
		select {
		case <-ctx.Done():
			return
		case s = <-ch:
		}
		now := time.Now()
		w.mu.Lock()
		var hints []Hint
		switch {
		case s.Reloaded:
			hints = w.expand(target{kind: KindLoaded}, "daemon-reload", now)
		case s.Resync:
			hints = w.expand(target{kind: KindLoaded}, "the bus connection was made again", now)
		default:
			name := strings.TrimSuffix(strings.TrimPrefix(s.Unit, "agent-gateway@"), ".service")
			if _, ok := w.profiles[name]; ok && layout.Unit(name) == s.Unit {
				hints = []Hint{{Profile: name, Kind: KindProcess, What: s.Unit + " " + strings.Join(s.Properties, ","), At: now}}
			}
		}
		w.mu.Unlock()
		for _, h := range hints {
			w.Hint(h)
		}
	}
}
