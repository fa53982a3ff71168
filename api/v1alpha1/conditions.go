package v1alpha1

// Condition types. Every status in this API reports metav1.Condition entries of these types.
const (
	// ConditionReady is True when the object does what its spec asks.
	ConditionReady = "Ready"
	// ConditionProgressing is True while a change is being rolled out.
	ConditionProgressing = "Progressing"
	// ConditionDegraded is True when something failed; its message names what and where.
	ConditionDegraded = "Degraded"
	// ConditionAligned is True when a GatewayInstance's running process was proven to import
	// exactly the intended release (one PYTHONPATH, resolving into that release's tree).
	ConditionAligned = "Aligned"
	// ConditionIsolated is True when a GatewayInstance runs under Production isolation and the
	// hardening was verified on the host. Convenience mode always reports False.
	ConditionIsolated = "Isolated"
	// ConditionPaused is True when a rollout is paused by a person or by a canary step.
	ConditionPaused = "Paused"
	// ConditionReachable is False when a GatewayHost's heartbeat is older than the grace period.
	ConditionReachable = "Reachable"
)

// Well-known labels and finalizers.
const (
	// LabelProfile is set on every GatewayInstance to its GatewayProfile's name.
	LabelProfile = "gateway.agent.dev/profile"
	// LabelHost is set on every GatewayInstance to its GatewayHost's name; agents watch by it.
	LabelHost = "gateway.agent.dev/host"
	// FinalizerInstanceUnits is removed by a host's agent only once the instance's unit is gone.
	FinalizerInstanceUnits = "gateway.agent.dev/units"
	// FinalizerReleaseInUse keeps a Release while a GatewayProfile references it.
	FinalizerReleaseInUse = "gateway.agent.dev/in-use"
)
