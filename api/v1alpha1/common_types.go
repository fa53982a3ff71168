package v1alpha1

// EntrypointMode says how the launcher starts a gateway process.
// +kubebuilder:validation:Enum=cli;script
type EntrypointMode string

const (
	// EntrypointCLI runs `python -m agent_cli.main gateway run --replace`.
	EntrypointCLI EntrypointMode = "cli"
	// EntrypointScript runs `python <exec>`, with exec resolved inside the release tree.
	EntrypointScript EntrypointMode = "script"
)

// IsolationMode says how strongly a profile is separated from its siblings on a host.
// +kubebuilder:validation:Enum=Production;Convenience
type IsolationMode string

const (
	// IsolationProduction runs the profile as its own system user `agent-<profile>` with a
	// hardened unit (read-only system, no capabilities, network denied but for an allowlist).
	IsolationProduction IsolationMode = "Production"
	// IsolationConvenience runs every profile as one shared user. State is kept apart by folder
	// only; the instance never reports Isolated.
	IsolationConvenience IsolationMode = "Convenience"
)

// HomeRetention says what happens to a profile's home folder when its instance is removed.
// +kubebuilder:validation:Enum=Retain;Purge
type HomeRetention string

const (
	// HomeRetain keeps the home folder (the default): state survives a re-add.
	HomeRetain HomeRetention = "Retain"
	// HomePurge deletes the home folder together with the unit.
	HomePurge HomeRetention = "Purge"
)

// DriftPolicy says what a node agent does about a change on its host to what it rendered.
// +kubebuilder:validation:Enum=Heal;Report
type DriftPolicy string

const (
	// DriftHeal puts back what was rendered and proves the gateway again (the default).
	DriftHeal DriftPolicy = "Heal"
	// DriftReport leaves the host as found and reports what changed.
	DriftReport DriftPolicy = "Report"
)

// EnvVar is one variable added to a profile's environment file.
// +kubebuilder:validation:XValidation:rule="!self.name.startsWith('AGENT_') && !self.name.startsWith('PYTHON') && !self.name.startsWith('LD_')",message="env names starting with AGENT_, PYTHON or LD_ are reserved: the agent sets the runtime path and identity itself"
// +kubebuilder:validation:XValidation:rule="!(has(self.value) && size(self.value) > 0 && has(self.valueFrom))",message="set at most one of value and valueFrom"
type EnvVar struct {
	// Name of the variable: letters, digits and underscores, not starting with a digit.
	// Names starting with AGENT_, PYTHON or LD_ are reserved.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +kubebuilder:validation:Pattern=`^[A-Za-z_][A-Za-z0-9_]*$`
	Name string `json:"name"`

	// Value of the variable, on one line. Never a secret: every agent can read it. Use valueFrom
	// for a secret.
	// +kubebuilder:validation:MaxLength=4096
	// +kubebuilder:validation:XValidation:rule="!self.contains('\\n') && !self.contains('\\r')",message="env values must be a single line"
	// +optional
	Value string `json:"value,omitempty"`

	// ValueFrom takes the value from a key of a Secret in the operator's namespace. Only the
	// hosts that run the profile may read that Secret.
	// +optional
	ValueFrom *EnvVarSource `json:"valueFrom,omitempty"`
}

// EnvVarSource is where a variable's value comes from.
type EnvVarSource struct {
	// SecretKeyRef names a key of a Secret in the operator's namespace.
	SecretKeyRef KeySelector `json:"secretKeyRef"`
}

// KeySelector names one key of a Secret or ConfigMap in the operator's namespace.
type KeySelector struct {
	// Name of the Secret or ConfigMap.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	Name string `json:"name"`

	// Key within its data.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[-._a-zA-Z0-9]+$`
	Key string `json:"key"`
}

// SecretReference names a Secret in the operator's namespace.
type SecretReference struct {
	// Name of the Secret.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	// +kubebuilder:validation:Pattern=`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`
	Name string `json:"name"`
}

// EnvFromSource adds every key of a Secret as a variable. Each key, after the prefix, must be a
// variable name that is not reserved; otherwise the profile reports MaterialInvalid.
type EnvFromSource struct {
	// Prefix is put before every key; empty by default.
	// +kubebuilder:validation:MaxLength=64
	// +kubebuilder:validation:Pattern=`^([A-Za-z_][A-Za-z0-9_]*)?$`
	// +kubebuilder:validation:XValidation:rule="!self.startsWith('AGENT_') && !self.startsWith('PYTHON') && !self.startsWith('LD_')",message="prefixes starting with AGENT_, PYTHON or LD_ are reserved"
	// +optional
	Prefix string `json:"prefix,omitempty"`

	// SecretRef names the Secret.
	SecretRef SecretReference `json:"secretRef"`
}

// FileSource is one file the agent writes under the profile's home, owned by the profile's
// user, from one key of a Secret or a ConfigMap in the operator's namespace.
// +kubebuilder:validation:XValidation:rule="has(self.secretKeyRef) != has(self.configMapKeyRef)",message="set exactly one of secretKeyRef and configMapKeyRef"
type FileSource struct {
	// Path of the file relative to the profile's home (AGENT_HOME), e.g. "config/app.yaml" or
	// ".env": no leading '/', no '..' or '.' segment, no empty segment. The folder run/ is the
	// agent's and refused.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=255
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9_.][A-Za-z0-9_./-]*$`
	// +kubebuilder:validation:XValidation:rule="!self.split('/').exists(s, s == '' || s == '.' || s == '..')",message="path must stay inside home: no '..' or '.' segment, no empty segment, no trailing '/'"
	// +kubebuilder:validation:XValidation:rule="self != 'run' && !self.startsWith('run/')",message="path must not be under run/: the agent's sockets live there"
	Path string `json:"path"`

	// Mode of the file, e.g. 0600 (384, the default) or 0400. Neither group nor others may
	// write it, and the owner may read it.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=511
	// +kubebuilder:validation:XValidation:rule="(self / 256) % 2 == 1",message="mode must let the owner read (0400)"
	// +kubebuilder:validation:XValidation:rule="(self / 16) % 2 == 0 && (self / 2) % 2 == 0",message="mode must not let group or others write (no 0020 or 0002)"
	// +optional
	Mode *int32 `json:"mode,omitempty"`

	// SecretKeyRef takes the content from a Secret key.
	// +optional
	SecretKeyRef *KeySelector `json:"secretKeyRef,omitempty"`

	// ConfigMapKeyRef takes the content from a ConfigMap key (data or binaryData).
	// +optional
	ConfigMapKeyRef *KeySelector `json:"configMapKeyRef,omitempty"`
}

// DefaultFileMode is the mode of a profile file whose mode is unset.
const DefaultFileMode int32 = 0o600

// Bounds of a profile's material, as the CRD schema and the controller check them.
const (
	// MaxEnvValueBytes is the largest value a variable may take from a Secret.
	MaxEnvValueBytes = 4096
	// MaxFileBytes is the largest file a profile may take from a Secret or ConfigMap.
	MaxFileBytes = 256 << 10
	// MaxMaterialBytes is the most a profile's material may weigh in all.
	MaxMaterialBytes = 1 << 20
)

// ReleaseArtifact is what a host needs to fetch and verify one runtime build. It is copied from
// a Release into each GatewayInstance so an agent never has to read Releases itself.
type ReleaseArtifact struct {
	// Name of the Release this artifact was copied from.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`

	// URL of the release tarball (.tar.gz): http, https or file.
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^(https?|file)://.+$`
	URL string `json:"url"`

	// SHA256 of the tarball, 64 lowercase hex digits. Checked before anything is unpacked.
	// +kubebuilder:validation:Pattern=`^[a-f0-9]{64}$`
	SHA256 string `json:"sha256"`

	// Label names the release for people, e.g. "1.4.2". It is part of the release folder's
	// name on each host: `/opt/agent/releases/<sha256>-<label>`.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`
	Label string `json:"label"`
}

// EgressRule is one destination a Production-isolated gateway may reach: an IP address, a CIDR,
// or one of the systemd keywords localhost, link-local and multicast.
// +kubebuilder:validation:MaxLength=64
// +kubebuilder:validation:XValidation:rule="self in ['localhost', 'link-local', 'multicast'] || isIP(self) || isCIDR(self)",message="must be an IP address, a CIDR, or one of localhost, link-local, multicast"
type EgressRule string
