package drift

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// Digest is how a file's content appears in Expected and Found: enough of its sha256 to tell
// two versions apart in a message.
func Digest(content []byte) string {
	sum := sha256.Sum256(content)
	return "sha256:" + hex.EncodeToString(sum[:])[:16]
}

// Link is how a symlink appears in Expected and Found.
func Link(target string) string { return "link:" + target }

// maxRead bounds what is read of one file: the files compared are small, and a huge one is
// drift whatever its content.
const maxRead = 16 << 20

// Value reads one path inside the host as Expected and Found hold it: a symlink's target (never
// followed), a regular file's digest, Absent when missing, or "unreadable"/"not a file".
func Value(h layout.Host, hostPath string) string {
	file := h.On(hostPath)
	fi, err := os.Lstat(file)
	switch {
	case os.IsNotExist(err):
		return Absent
	case err != nil:
		return "unreadable"
	case fi.Mode()&os.ModeSymlink != 0:
		t, err := os.Readlink(file)
		if err != nil {
			return "unreadable"
		}
		return Link(t)
	case !fi.Mode().IsRegular():
		return "not a file (" + fi.Mode().Type().String() + ")"
	}
	fd, err := unix.Open(file, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return "unreadable"
	}
	f := os.NewFile(uintptr(fd), file)
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxRead))
	if err != nil {
		return "unreadable"
	}
	return Digest(b)
}

// ReadFiles reads every path of paths (inside the host).
func ReadFiles(h layout.Host, paths []string) map[string]string {
	m := make(map[string]string, len(paths))
	for _, p := range paths {
		m[p] = Value(h, p)
	}
	return m
}

// ReadDropIns reads every drop-in (a *.conf entry) in every folder systemd reads for the
// profile's unit.
func ReadDropIns(h layout.Host, p layout.Profile) map[string]string {
	m := map[string]string{}
	for _, dir := range DropInDirs(p) {
		entries, err := os.ReadDir(h.On(dir))
		if err != nil {
			continue
		}
		for _, e := range entries {
			if strings.HasSuffix(e.Name(), ".conf") {
				f := path.Join(dir, e.Name())
				m[f] = Value(h, f)
			}
		}
	}
	return m
}

// NewExpected is the state to compare a freshly proven profile against: inputs are the files the
// agent rendered (host path -> value), mainPID and loaded what systemd reported with the proof.
// The drop-ins of folders the agent does not own are taken as found: they were there when the
// profile was proven.
func NewExpected(h layout.Host, p layout.Profile, inputs map[string]string, mainPID uint32, loaded []string) Expected {
	files := make(map[string]string, len(inputs))
	for _, f := range UnitFiles(p) {
		files[f] = Absent
	}
	for f, v := range inputs {
		files[f] = v
	}
	owned := OwnedDropInDirs(p)
	dropIns := map[string]string{}
	for f, v := range ReadDropIns(h, p) {
		if !slices.Contains(owned, path.Dir(f)) {
			dropIns[f] = v
		}
	}
	return Expected{Profile: p, Files: files, DropIns: dropIns, Loaded: slices.Clone(loaded), MainPID: mainPID}
}

// Read reads, for the files and drop-ins exp names, what the host holds now. The unit's facts
// come from systemd and are filled in by the caller.
func Read(h layout.Host, exp Expected) Found {
	paths := make([]string, 0, len(exp.Files))
	for f := range exp.Files {
		paths = append(paths, f)
	}
	return Found{Files: ReadFiles(h, paths), DropIns: ReadDropIns(h, exp.Profile)}
}
