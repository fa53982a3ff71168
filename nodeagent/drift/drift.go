// Package drift notices when what the node agent rendered and proved on its host changes behind
// its back, and says precisely what changed. A Watcher turns inotify events on the files the
// agent owns (and on every folder systemd reads drop-ins from) and systemd's D-Bus signals about
// the gateway units into hints per profile; Compare, a pure function, turns the facts read
// after a hint into findings: which file, unit property or process, what was expected and what
// was found. Nothing here polls.
package drift

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// Kind is one kind of drift; it is the `kind` label of gateway_agent_drift_total.
type Kind string

// The kinds of drift.
const (
	// KindEnv is the profile's environment file.
	KindEnv Kind = "env"
	// KindDropIn is a drop-in added, changed or removed in a folder systemd reads for the unit.
	KindDropIn Kind = "dropin"
	// KindUnit is the template unit, or a unit file that would take its place.
	KindUnit Kind = "unit"
	// KindLink is the profile's `current` or `last-good` link.
	KindLink Kind = "link"
	// KindLauncher is the launcher every gateway starts through.
	KindLauncher Kind = "launcher"
	// KindRelease is a file in the release tree a profile runs.
	KindRelease Kind = "release"
	// KindProcess is a new main process: systemd restarted the gateway on its own.
	KindProcess Kind = "process"
	// KindState is the unit no longer active (stopped by hand, failed).
	KindState Kind = "state"
	// KindLoaded is what systemd has loaded: other drop-ins, or files changed since loaded.
	KindLoaded Kind = "loaded"
)

// Hint is a sign that something of a profile may have changed: an inotify event or a systemd
// signal. It carries no verdict; Compare decides.
type Hint struct {
	// Profile is the profile concerned; empty for every profile.
	Profile string
	Kind    Kind
	// What names the file (a path inside the host) or the unit and its properties.
	What string
	At   time.Time
}

// Finding is one difference between what was proven and what is on the host now.
type Finding struct {
	Kind Kind
	// What is a path inside the host, or a unit property ("agent-gateway@core.service MainPID").
	What            string
	Expected, Found string
}

func (f Finding) String() string {
	return fmt.Sprintf("%s %s: expected %s, found %s", f.Kind, f.What, orNone(f.Expected), orNone(f.Found))
}

func orNone(s string) string {
	if s == "" {
		return "nothing"
	}
	return s
}

// Summary is one line naming every finding and when the first sign of it was seen.
func Summary(at time.Time, fs []Finding) string {
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = f.String()
	}
	return fmt.Sprintf("changed at %s: %s", at.UTC().Format(time.RFC3339Nano), strings.Join(parts, "; "))
}

// Absent is the value of a file or link that does not exist.
const Absent = ""

// Expected is what the agent rendered and proved for one profile: the state drift is measured
// against.
type Expected struct {
	Profile layout.Profile
	// Files are host paths with their expected value: "sha256:<hex>" for a file, "link:<target>"
	// for a symlink, Absent for a path that must not exist (a unit file that would replace the
	// template).
	Files map[string]string
	// DropIns are the drop-ins found, when the profile was proven, in folders of systemd's
	// search path that the agent does not own (host path -> value). In the folders it owns
	// (OwnedDropInDirs) only its own drop-in is expected.
	DropIns map[string]string
	// Loaded are the drop-ins systemd had loaded for the unit when it was proven.
	Loaded []string
	// MainPID is the proven main process.
	MainPID uint32
}

// Found are the same facts read from the host and systemd now.
type Found struct {
	Files   map[string]string
	DropIns map[string]string
	Unit    UnitFacts
}

// UnitFacts is what systemd says about the unit now.
type UnitFacts struct {
	ActiveState, SubState string
	MainPID               uint32
	Loaded                []string
	NeedDaemonReload      bool
}

// Transitional tells whether the unit is on its way between states (starting, stopping, waiting
// to be restarted): systemd announces where it ends up.
func (u UnitFacts) Transitional() bool {
	switch u.ActiveState {
	case "activating", "deactivating", "reloading":
		return true
	}
	return u.SubState == "auto-restart"
}

// Compare lists every difference between exp and found, in a stable order.
func Compare(exp Expected, found Found) []Finding {
	var out []Finding
	for _, f := range sortedKeys(exp.Files) {
		if got := found.Files[f]; got != exp.Files[f] {
			out = append(out, Finding{Kind: kindOf(exp.Profile, f), What: f, Expected: exp.Files[f], Found: got})
		}
	}
	own := exp.Profile.DropIn
	owned := OwnedDropInDirs(exp.Profile)
	for _, f := range sortedKeys(found.DropIns) {
		if f == own {
			continue // its text is checked with the files
		}
		if slices.Contains(owned, path.Dir(f)) {
			out = append(out, Finding{Kind: KindDropIn, What: f, Expected: Absent, Found: found.DropIns[f]})
			continue
		}
		if want, ok := exp.DropIns[f]; !ok || want != found.DropIns[f] {
			out = append(out, Finding{Kind: KindDropIn, What: f, Expected: want, Found: found.DropIns[f]})
		}
	}
	for _, f := range sortedKeys(exp.DropIns) {
		if _, ok := found.DropIns[f]; !ok {
			out = append(out, Finding{Kind: KindDropIn, What: f, Expected: exp.DropIns[f], Found: Absent})
		}
	}
	u := exp.Profile.Unit
	if st := found.Unit.ActiveState + "/" + found.Unit.SubState; found.Unit.ActiveState != "active" {
		out = append(out, Finding{Kind: KindState, What: u + " ActiveState/SubState", Expected: "active/running", Found: st})
	}
	if found.Unit.MainPID != exp.MainPID && found.Unit.MainPID != 0 {
		out = append(out, Finding{Kind: KindProcess, What: u + " MainPID", Expected: fmt.Sprint(exp.MainPID), Found: fmt.Sprint(found.Unit.MainPID)})
	}
	if !slices.Equal(sorted(exp.Loaded), sorted(found.Unit.Loaded)) {
		out = append(out, Finding{Kind: KindLoaded, What: u + " DropInPaths", Expected: strings.Join(sorted(exp.Loaded), ","), Found: strings.Join(sorted(found.Unit.Loaded), ",")})
	}
	if found.Unit.NeedDaemonReload {
		out = append(out, Finding{Kind: KindLoaded, What: u + " NeedDaemonReload", Expected: "false", Found: "true"})
	}
	return out
}

// kindOf tells which kind of file a path of Expected.Files is.
func kindOf(p layout.Profile, f string) Kind {
	switch {
	case f == p.Env:
		return KindEnv
	case f == p.Current || f == path.Join(p.Dir, "last-good"):
		return KindLink
	case f == layout.LauncherPath:
		return KindLauncher
	case f == p.DropIn:
		return KindDropIn
	}
	return KindUnit
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// OnlyProcess tells whether every finding is about the main process or the unit's state: the
// files are as rendered, so a process systemd started from them can be proven as it runs.
func OnlyProcess(fs []Finding) bool {
	for _, f := range fs {
		if f.Kind != KindProcess && f.Kind != KindState {
			return false
		}
	}
	return len(fs) > 0
}

// Has tells whether any finding is of kind k.
func Has(fs []Finding, k Kind) bool {
	return slices.ContainsFunc(fs, func(f Finding) bool { return f.Kind == k })
}
