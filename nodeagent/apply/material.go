package apply

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/unit"
	"github.com/agent-gateway/gateway-operator/nodeagent/userfs"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
)

// materialRecord is what the agent last wrote into a profile's home from Secrets and
// ConfigMaps, kept root-only beside the env file: the next apply knows which files it put there
// (and removes those no longer wanted), and a rollback writes the previous ones back.
type materialRecord struct {
	Files []v1.MaterialFile `json:"files"`
}

// maxRecordBytes bounds the record the agent reads back: the material's own bound, base64
// and JSON framing included.
const maxRecordBytes = 2*v1.MaxMaterialBytes + 64<<10

// readMaterial reads the profile's record; none is an empty one.
func (a *Applier) readMaterial(p layout.Profile) (materialRecord, error) {
	var rec materialRecord
	fd, err := unix.Open(a.Host.On(p.Material), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return rec, nil
	}
	if err != nil {
		return rec, fmt.Errorf("read %s: %w", p.Material, err)
	}
	f := os.NewFile(uintptr(fd), p.Material)
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxRecordBytes+1))
	if err != nil {
		return rec, fmt.Errorf("read %s: %w", p.Material, err)
	}
	if len(b) > maxRecordBytes {
		return rec, fmt.Errorf("%s is larger than %d bytes", p.Material, maxRecordBytes)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("read %s: %w", p.Material, err)
	}
	return rec, nil
}

// writeMaterial puts the instance's files into the profile's home, removes the files of the
// previous record that are no longer wanted, and records the new set. It returns the previous
// record, for a rollback, also when it fails part way: the undo then writes it back.
func (a *Applier) writeMaterial(p layout.Profile, u *users.User, files []v1.MaterialFile) (*materialRecord, error) {
	before, err := a.readMaterial(p)
	if err != nil {
		return nil, err
	}
	if len(files) == 0 && len(before.Files) == 0 {
		return &before, nil
	}
	return &before, a.placeMaterial(p, u, before.Files, files)
}

// restoreMaterial writes a previous record's files back, owned by u, and records it again;
// whatever the record on disk names beyond it is removed.
func (a *Applier) restoreMaterial(p layout.Profile, u *users.User, rec materialRecord) error {
	now, err := a.readMaterial(p)
	if err != nil {
		return err
	}
	return a.placeMaterial(p, u, now.Files, rec.Files)
}

// renderedUser is the user a rendered drop-in runs the gateway as (an earlier isolation mode
// may have named another), so restored files are that user's; def when it names none of the
// profile's two possible accounts or the account is gone.
func (a *Applier) renderedUser(p layout.Profile, r *rendered, def *users.User) *users.User {
	for _, line := range strings.Split(r.dropIn, "\n") {
		name, ok := strings.CutPrefix(line, "User=")
		if !ok || (name != p.User && name != unit.SharedUser) {
			continue
		}
		if u, err := a.users().Lookup(name); err == nil && u != nil {
			return u
		}
	}
	return def
}

// placeMaterial replaces the files of old by those of want in the home, then records want.
// Each file is checked again here, whatever the API server and the controller allowed. Before
// the first file is written the record names both sets, so a failure part way (a folder the
// gateway put at a path, say) leaves no written file that a later apply or removal would not
// find.
func (a *Applier) placeMaterial(p layout.Profile, u *users.User, old, want []v1.MaterialFile) error {
	wanted := map[string]bool{}
	for _, f := range want {
		if err := errors.Join(v1.ValidateFilePath(f.Path), v1.ValidateFileMode(f.Mode)); err != nil {
			return err
		}
		if len(f.Data) > v1.MaxFileBytes {
			return fmt.Errorf("file %s is larger than %d bytes", f.Path, v1.MaxFileBytes)
		}
		wanted[f.Path] = true
	}
	both := append([]v1.MaterialFile(nil), want...)
	for _, f := range old {
		if !wanted[f.Path] {
			both = append(both, f)
		}
	}
	if err := a.recordMaterial(p, both); err != nil {
		return err
	}
	home, err := userfs.OpenDir(a.Host.On(p.Home))
	if err != nil {
		return err
	}
	defer home.Close()
	owner := userfs.Owner{UID: u.UID, GID: u.GID}
	for _, f := range want {
		if _, err := userfs.WriteFile(home, f.Path, f.Data, os.FileMode(f.Mode), owner); err != nil { //nolint:gosec // mode checked above: at most 0777
			return err
		}
	}
	// Every stale file is tried; one that cannot go stays recorded.
	var errs []error
	for _, f := range old {
		if wanted[f.Path] || v1.ValidateFilePath(f.Path) != nil {
			continue
		}
		// A folder at the path is someone else's, not a file written here.
		if err := userfs.Remove(home, f.Path); err != nil && !errors.Is(err, unix.EISDIR) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return a.recordMaterial(p, want)
}

// recordMaterial writes the record of the files in the home, root-only.
func (a *Applier) recordMaterial(p layout.Profile, files []v1.MaterialFile) error {
	b, err := json.Marshal(materialRecord{Files: files})
	if err != nil {
		return err
	}
	_, err = writeIfChanged(a.Host.On(p.Material), string(b), 0o600)
	return err
}

// removeMaterial deletes the files the record names from the profile's home.
func (a *Applier) removeMaterial(p layout.Profile) error {
	rec, err := a.readMaterial(p)
	if err != nil || len(rec.Files) == 0 {
		return err
	}
	home, err := userfs.OpenDir(a.Host.On(p.Home))
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer home.Close()
	for _, f := range rec.Files {
		if v1.ValidateFilePath(f.Path) != nil {
			continue
		}
		if err := userfs.Remove(home, f.Path); err != nil {
			return err
		}
	}
	return nil
}
