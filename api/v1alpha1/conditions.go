package v1alpha1

// ConditionType is the type of a LoadBalancerRule status condition. Every
// condition has positive polarity: True is the healthy state.
type ConditionType string

const (
	// ConditionAccepted is True when the spec is valid and the rule holds its
	// frontend port.
	ConditionAccepted ConditionType = "Accepted"
	// ConditionResolvedRefs is True when the backend Service exists (always
	// True for an IP-based pool).
	ConditionResolvedRefs ConditionType = "ResolvedRefs"
	// ConditionProgrammed is True when the dataplane serves this generation.
	ConditionProgrammed ConditionType = "Programmed"
	// ConditionReady is True when the rule is Accepted, ResolvedRefs and
	// Programmed and has at least one healthy backend.
	ConditionReady ConditionType = "Ready"
)

// ConditionReason explains a condition's status.
type ConditionReason string

const (
	// ReasonAccepted (Accepted=True): the rule holds its frontend port.
	ReasonAccepted ConditionReason = "Accepted"
	// ReasonPortConflict (Accepted=False): an older rule on the same frontend
	// holds the port and protocol; the message names it.
	ReasonPortConflict ConditionReason = "PortConflict"
	// ReasonInvalidSpec (Accepted=False): a combination the schema cannot check
	// is invalid; the message names the field.
	ReasonInvalidSpec ConditionReason = "InvalidSpec"

	// ReasonResolvedRefs (ResolvedRefs=True): the backend pool resolves.
	ReasonResolvedRefs ConditionReason = "ResolvedRefs"
	// ReasonBackendNotFound (ResolvedRefs=False): the backend Service does not exist.
	ReasonBackendNotFound ConditionReason = "BackendNotFound"

	// ReasonProgrammed (Programmed=True): the dataplane serves this generation.
	ReasonProgrammed ConditionReason = "Programmed"
	// ReasonPending (Programmed=False): the dataplane has not applied this
	// generation yet.
	ReasonPending ConditionReason = "Pending"
	// ReasonListenFailed (Programmed=False): the dataplane could not open the
	// frontend port.
	ReasonListenFailed ConditionReason = "ListenFailed"

	// ReasonReady (Ready=True): the rule serves traffic.
	ReasonReady ConditionReason = "Ready"
	// ReasonNotAccepted, ReasonRefsNotResolved, ReasonNotProgrammed
	// (Ready=False): the named condition is not True.
	ReasonNotAccepted     ConditionReason = "NotAccepted"
	ReasonRefsNotResolved ConditionReason = "RefsNotResolved"
	ReasonNotProgrammed   ConditionReason = "NotProgrammed"
	// ReasonNoHealthyBackends (Ready=False): no backend is ready and passing
	// its probe.
	ReasonNoHealthyBackends ConditionReason = "NoHealthyBackends"
)
