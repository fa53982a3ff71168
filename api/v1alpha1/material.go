package v1alpha1

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Reasons of a profile's material that cannot be resolved, on the profile's Ready condition and
// the instance's. Their messages name objects and keys, never a value.
const (
	// ReasonMaterialNotFound: a Secret, ConfigMap or key the settings name does not exist.
	ReasonMaterialNotFound = "MaterialNotFound"
	// ReasonMaterialInvalid: a value is too large, not a valid variable, or a path is refused.
	ReasonMaterialInvalid = "MaterialInvalid"
)

// MaterialLabel set to "true" lets profiles name a Secret or ConfigMap of the material
// namespace. The controller resolves and grants only labeled objects and its cache holds no
// other, so a user who may edit profiles cannot have an unrelated Secret of that namespace
// (another profile's credentials, a Helm release) sent to a host.
const MaterialLabel = "gateway.agent.dev/material"

// MaterialLabeled reports whether o carries MaterialLabel=true.
func MaterialLabeled(o metav1.Object) bool {
	return o.GetLabels()[MaterialLabel] == "true"
}

// MaterialError says why a profile's material cannot be resolved. Its message carries no value.
type MaterialError struct {
	Reason string
	Msg    string
}

func (e *MaterialError) Error() string { return e.Msg }

func notFound(format string, a ...any) error {
	return &MaterialError{Reason: ReasonMaterialNotFound, Msg: fmt.Sprintf(format, a...)}
}

func invalid(format string, a ...any) error {
	return &MaterialError{Reason: ReasonMaterialInvalid, Msg: fmt.Sprintf(format, a...)}
}

// Material is a profile's resolved environment and files. It holds secret values: it is never
// written to an object, a log line or an event.
type Material struct {
	// Env is the profile's whole environment: env in order, each valueFrom resolved, then the
	// keys of every envFrom Secret.
	Env []EnvVar
	// Files are the files to write under the profile's home, sorted by path.
	Files []MaterialFile
	// Digest is what MaterialSource.Digest must equal; empty when the settings name nothing.
	Digest string
}

// MaterialFile is one file for the profile's home.
type MaterialFile struct {
	Path string
	Mode int32
	Data []byte
}

// MaterialRefs lists the Secrets and ConfigMaps the settings name, sorted and without repeats.
func (s *GatewaySettings) MaterialRefs() (secrets, configMaps []string) {
	for _, e := range s.Env {
		if e.ValueFrom != nil {
			secrets = append(secrets, e.ValueFrom.SecretKeyRef.Name)
		}
	}
	for _, e := range s.EnvFrom {
		secrets = append(secrets, e.SecretRef.Name)
	}
	for _, f := range s.Files {
		switch {
		case f.SecretKeyRef != nil:
			secrets = append(secrets, f.SecretKeyRef.Name)
		case f.ConfigMapKeyRef != nil:
			configMaps = append(configMaps, f.ConfigMapKeyRef.Name)
		}
	}
	sort.Strings(secrets)
	sort.Strings(configMaps)
	return slices.Compact(secrets), slices.Compact(configMaps)
}

// UsesMaterial reports whether the settings name any Secret or ConfigMap.
func (s *GatewaySettings) UsesMaterial() bool {
	sec, cms := s.MaterialRefs()
	return len(sec)+len(cms) > 0
}

var (
	envNameRE  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	filePathRE = regexp.MustCompile(`^[A-Za-z0-9_.][A-Za-z0-9_./-]*$`)
)

// ReservedEnvName reports whether a profile may not set a variable: the agent sets the runtime
// path and identity itself.
func ReservedEnvName(name string) bool {
	return strings.HasPrefix(name, "AGENT_") || strings.HasPrefix(name, "PYTHON") || strings.HasPrefix(name, "LD_")
}

// ValidateFilePath checks a file's path the way the CRD schema does: relative to the home,
// without '.', '..' or empty segments, not under the agent's run/ folder.
func ValidateFilePath(p string) error {
	if len(p) == 0 || len(p) > 255 || !filePathRE.MatchString(p) {
		return invalid("file path %q must be 1 to 255 characters of letters, digits, '_', '.', '-' and '/', relative to home", p)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return invalid("file path %q must stay inside home: no '..' or '.' segment, no empty segment", p)
		}
	}
	if p == "run" || strings.HasPrefix(p, "run/") {
		return invalid("file path %q is under run/, the agent's", p)
	}
	return nil
}

// ValidateFileMode checks a file's mode the way the CRD schema does.
func ValidateFileMode(m int32) error {
	if m < 0 || m > 0o777 || m&0o400 == 0 || m&0o022 != 0 {
		return invalid("file mode %#o must let the owner read and neither group nor others write", m)
	}
	return nil
}

// ValidateMaterialIsolation refuses material in Convenience isolation, as the CRD schema does:
// there every profile runs as one shared user, which can read every other profile's files and
// /proc/<pid>/environ, so a secret there would be every Convenience gateway's on the host.
func (s *GatewaySettings) ValidateMaterialIsolation() error {
	if s.Isolation == IsolationConvenience && s.UsesMaterial() {
		return invalid("isolation Convenience runs every profile as one shared user that can read the others' files and environment: env valueFrom, envFrom and files need isolation Production")
	}
	return nil
}

// unlabeledHint ends the message of a missing object: one without MaterialLabel counts as
// missing.
const unlabeledHint = " or not labeled " + MaterialLabel + `="true"; label it to let profiles use it`

// ResolveMaterial resolves the settings' env and files from the objects it names, keyed by
// name (a missing entry, or one without MaterialLabel, is a missing object), and computes their digest. The controller and the
// agent run it alike, so the agent can check it read what the controller rolled out. Values are
// checked against the bounds here, whatever the API server allowed.
func ResolveMaterial(s *GatewaySettings, secrets map[string]*corev1.Secret, configMaps map[string]*corev1.ConfigMap) (Material, error) {
	var m Material
	if !s.UsesMaterial() {
		m.Env = s.Env
		return m, nil
	}
	if err := s.ValidateMaterialIsolation(); err != nil {
		return Material{}, err
	}
	total := 0
	seen := map[string]bool{}
	addEnv := func(name, value, from string) error {
		switch {
		case !envNameRE.MatchString(name) || len(name) > 128:
			return invalid("%s: %q is not a variable name", from, name)
		case ReservedEnvName(name):
			return invalid("%s: variable %s is reserved (AGENT_, PYTHON, LD_)", from, name)
		case seen[name]:
			return invalid("%s: variable %s is set twice", from, name)
		case len(value) > MaxEnvValueBytes:
			// The bound only: a value's exact size says something about it.
			return invalid("%s: the value of %s is more than %d bytes", from, name, MaxEnvValueBytes)
		case strings.ContainsAny(value, "\n\r\x00") || !utf8.ValidString(value):
			return invalid("%s: the value of %s must be one line of UTF-8 text", from, name)
		}
		seen[name] = true
		total += len(value)
		m.Env = append(m.Env, EnvVar{Name: name, Value: value})
		return nil
	}
	secretKey := func(ref KeySelector) ([]byte, error) {
		sec, ok := secrets[ref.Name]
		if !ok || !MaterialLabeled(sec) {
			return nil, notFound("Secret %q not found%s", ref.Name, unlabeledHint)
		}
		v, ok := sec.Data[ref.Key]
		if !ok {
			return nil, notFound("Secret %q has no key %q", ref.Name, ref.Key)
		}
		return v, nil
	}
	for _, e := range s.Env {
		value, from := e.Value, "env "+e.Name
		if e.ValueFrom != nil {
			ref := e.ValueFrom.SecretKeyRef
			v, err := secretKey(ref)
			if err != nil {
				return Material{}, err
			}
			value, from = string(v), fmt.Sprintf("env %s from Secret %q key %q", e.Name, ref.Name, ref.Key)
		}
		if err := addEnv(e.Name, value, from); err != nil {
			return Material{}, err
		}
	}
	for _, e := range s.EnvFrom {
		sec, ok := secrets[e.SecretRef.Name]
		if !ok || !MaterialLabeled(sec) {
			return Material{}, notFound("Secret %q not found%s", e.SecretRef.Name, unlabeledHint)
		}
		keys := make([]string, 0, len(sec.Data))
		for k := range sec.Data {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if err := addEnv(e.Prefix+k, string(sec.Data[k]), fmt.Sprintf("envFrom Secret %q", e.SecretRef.Name)); err != nil {
				return Material{}, err
			}
		}
	}
	for _, f := range s.Files {
		if err := ValidateFilePath(f.Path); err != nil {
			return Material{}, err
		}
		mode := DefaultFileMode
		if f.Mode != nil {
			mode = *f.Mode
		}
		if err := ValidateFileMode(mode); err != nil {
			return Material{}, err
		}
		var data []byte
		var from string
		switch {
		case f.SecretKeyRef != nil:
			v, err := secretKey(*f.SecretKeyRef)
			if err != nil {
				return Material{}, err
			}
			data, from = v, fmt.Sprintf("Secret %q key %q", f.SecretKeyRef.Name, f.SecretKeyRef.Key)
		case f.ConfigMapKeyRef != nil:
			ref := *f.ConfigMapKeyRef
			cm, ok := configMaps[ref.Name]
			if !ok || !MaterialLabeled(cm) {
				return Material{}, notFound("ConfigMap %q not found%s", ref.Name, unlabeledHint)
			}
			if v, ok := cm.Data[ref.Key]; ok {
				data = []byte(v)
			} else if b, ok := cm.BinaryData[ref.Key]; ok {
				data = b
			} else {
				return Material{}, notFound("ConfigMap %q has no key %q", ref.Name, ref.Key)
			}
			from = fmt.Sprintf("ConfigMap %q key %q", ref.Name, ref.Key)
		default:
			return Material{}, invalid("file %q names neither a Secret nor a ConfigMap", f.Path)
		}
		if len(data) > MaxFileBytes {
			return Material{}, invalid("file %q from %s is more than %d bytes", f.Path, from, MaxFileBytes)
		}
		total += len(data)
		m.Files = append(m.Files, MaterialFile{Path: f.Path, Mode: mode, Data: data})
	}
	if total > MaxMaterialBytes {
		return Material{}, invalid("the profile's material is more than %d bytes in all", MaxMaterialBytes)
	}
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
	for i := 1; i < len(m.Files); i++ {
		if a, b := m.Files[i-1].Path, m.Files[i].Path; a == b || strings.HasPrefix(b, a+"/") {
			return Material{}, invalid("file %q and file %q cannot both exist", a, b)
		}
	}
	m.Digest = m.digest(s, secrets, configMaps)
	return m, nil
}

// digest hashes the resolved material and the UIDs of the objects it came from. The UIDs are
// readable only by whoever may read the objects, so an agent that sees the digest in another
// host's instance cannot test guesses of a short value against it.
func (m Material) digest(s *GatewaySettings, secrets map[string]*corev1.Secret, configMaps map[string]*corev1.ConfigMap) string {
	h := sha256.New()
	field := func(b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	secNames, cmNames := s.MaterialRefs()
	for _, n := range secNames {
		field([]byte("secret"))
		field([]byte(n))
		field([]byte(secrets[n].UID))
	}
	for _, n := range cmNames {
		field([]byte("configmap"))
		field([]byte(n))
		field([]byte(configMaps[n].UID))
	}
	for _, e := range m.Env {
		field([]byte("env"))
		field([]byte(e.Name))
		field([]byte(e.Value))
	}
	for _, f := range m.Files {
		field([]byte("file"))
		field([]byte(f.Path))
		field([]byte(fmt.Sprintf("%o", f.Mode)))
		field(f.Data)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
