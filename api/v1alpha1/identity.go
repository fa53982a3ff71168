package v1alpha1

// The identity of a bare-metal node agent, and how a bootstrap token is tied to one host.
const (
	// AgentUserPrefix starts the user name of a host's agent: system:gateway-agent:<host>.
	AgentUserPrefix = "system:gateway-agent:"
	// AgentGroup is the group of every host's agent.
	AgentGroup = "system:gateway-agents"
	// AgentBootstrapGroup is the extra group (auth-extra-groups) of a bootstrap token issued
	// for a gateway host; RBAC lets it create certificate signing requests.
	AgentBootstrapGroup = "system:bootstrappers:gateway-agent"
	// BootstrapTokenHostAnnotation on a bootstrap token Secret names the one host the token
	// may get a certificate for.
	BootstrapTokenHostAnnotation = "gateway.agent.dev/host"
)
