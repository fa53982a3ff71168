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
type EnvVar struct {
	// Name of the variable: letters, digits and underscores, not starting with a digit.
	// Names starting with AGENT_, PYTHON or LD_ are reserved.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +kubebuilder:validation:Pattern=`^[A-Za-z_][A-Za-z0-9_]*$`
	Name string `json:"name"`

	// Value of the variable, on one line.
	// +kubebuilder:validation:MaxLength=4096
	// +kubebuilder:validation:XValidation:rule="!self.contains('\\n') && !self.contains('\\r')",message="env values must be a single line"
	// +optional
	Value string `json:"value,omitempty"`
}

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
