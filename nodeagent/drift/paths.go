package drift

import (
	"path"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// SearchPath is systemd 252's unit search path for the system manager, highest priority first
// (systemd.unit(5)); /lib/systemd/system is read on hosts where /lib is not merged into /usr.
var SearchPath = []string{
	"/etc/systemd/system.control",
	"/run/systemd/system.control",
	"/run/systemd/transient",
	"/run/systemd/generator.early",
	layout.UnitDir,
	"/etc/systemd/system.attached",
	"/run/systemd/system",
	"/run/systemd/system.attached",
	"/run/systemd/generator",
	"/usr/local/lib/systemd/system",
	"/usr/lib/systemd/system",
	"/lib/systemd/system",
	"/run/systemd/generator.late",
}

// dropInNames are the drop-in folder names systemd reads for agent-gateway@<p>.service: every
// service, the dash prefix of the template's name, the template, the instance.
func dropInNames(p layout.Profile) []string {
	return []string{"service.d", "agent-.service.d", layout.TemplateUnit + ".d", p.Unit + ".d"}
}

// DropInDirs are every folder systemd reads drop-ins for the profile's unit from.
func DropInDirs(p layout.Profile) []string {
	var dirs []string
	for _, base := range SearchPath {
		for _, n := range dropInNames(p) {
			dirs = append(dirs, path.Join(base, n))
		}
	}
	return dirs
}

// OwnedDropInDirs are the drop-in folders of the agent's own units in /etc and /run: nothing but
// the agent's drop-in belongs there, so any other file is drift, and healing sets it aside.
func OwnedDropInDirs(p layout.Profile) []string {
	return []string{
		path.Join(layout.UnitDir, p.Unit+".d"),
		path.Join(layout.UnitDir, layout.TemplateUnit+".d"),
		path.Join("/run/systemd/system", p.Unit+".d"),
		path.Join("/run/systemd/system", layout.TemplateUnit+".d"),
	}
}

// UnitFiles are the paths at which a unit file would replace the template for the profile:
// the instance's own name anywhere on the search path (systemd prefers it to the template),
// and the template's name ahead of /etc/systemd/system. The template itself comes last.
func UnitFiles(p layout.Profile) []string {
	var files []string
	before := true
	for _, base := range SearchPath {
		files = append(files, path.Join(base, p.Unit))
		if base == layout.UnitDir {
			before = false
		}
		if before {
			files = append(files, path.Join(base, layout.TemplateUnit))
		}
	}
	return append(files, path.Join(layout.UnitDir, layout.TemplateUnit))
}
