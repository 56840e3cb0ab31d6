package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// PortNumber is a TCP or UDP port.
// +kubebuilder:validation:Minimum=1
// +kubebuilder:validation:Maximum=65535
type PortNumber int32

// Protocol is the transport protocol a rule balances.
// +kubebuilder:validation:Enum=TCP;UDP;All
type Protocol string

const (
	ProtocolTCP Protocol = "TCP"
	ProtocolUDP Protocol = "UDP"
	// ProtocolAll balances TCP and UDP on the same port, as Azure's "All" does.
	ProtocolAll Protocol = "All"
)

// SessionPersistence selects which part of a flow picks its backend, with
// Azure Load Balancer's names for the three distribution modes.
// +kubebuilder:validation:Enum=None;ClientIP;ClientIPProtocol
type SessionPersistence string

const (
	// SessionPersistenceNone hashes the 5-tuple: each new connection may land
	// on a different backend.
	SessionPersistenceNone SessionPersistence = "None"
	// SessionPersistenceClientIP hashes the client IP and the frontend: every
	// flow of a client goes to one backend, whatever its protocol.
	SessionPersistenceClientIP SessionPersistence = "ClientIP"
	// SessionPersistenceClientIPProtocol hashes the client IP, the frontend and
	// the protocol: a client's TCP and UDP flows are pinned separately.
	SessionPersistenceClientIPProtocol SessionPersistence = "ClientIPProtocol"
)

// DefaultSessionPersistenceTimeoutInMinutes is how long a ClientIP or
// ClientIPProtocol rule keeps a client's pin when
// spec.sessionPersistenceTimeoutInMinutes is unset: three hours, as
// kube-proxy's ClientIP affinity. It is applied when a rule is translated
// for the dataplane, not by the schema, because a None rule must leave the
// field unset or 0.
const DefaultSessionPersistenceTimeoutInMinutes int32 = 180

// ServiceType is how a frontend is exposed outside the dataplane pods.
// +kubebuilder:validation:Enum=ClusterIP;NodePort;LoadBalancer
type ServiceType string

const (
	ServiceTypeClusterIP    ServiceType = "ClusterIP"
	ServiceTypeNodePort     ServiceType = "NodePort"
	ServiceTypeLoadBalancer ServiceType = "LoadBalancer"
)

// ProbeProtocol is how a health probe checks a backend.
// +kubebuilder:validation:Enum=TCP;HTTP;HTTPS
type ProbeProtocol string

const (
	// ProbeProtocolTCP passes when a TCP connection to the probe port opens.
	ProbeProtocolTCP ProbeProtocol = "TCP"
	// ProbeProtocolHTTP passes when GET requestPath answers 200.
	ProbeProtocolHTTP ProbeProtocol = "HTTP"
	// ProbeProtocolHTTPS passes when GET requestPath over TLS answers 200.
	ProbeProtocolHTTPS ProbeProtocol = "HTTPS"
)

// NoHealthyBackendsBehavior is what a rule does when every probed backend is down.
// +kubebuilder:validation:Enum=AllProbedDown;AllProbedUp
type NoHealthyBackendsBehavior string

const (
	// AllProbedDown refuses new flows while no backend passes its probe;
	// established TCP connections continue.
	AllProbedDown NoHealthyBackendsBehavior = "AllProbedDown"
	// AllProbedUp treats every backend as healthy while all probes fail.
	AllProbedUp NoHealthyBackendsBehavior = "AllProbedUp"
)

// ProxyProtocol is the PROXY protocol header (HAProxy's
// doc/proxy-protocol.txt) a rule sends to its backends.
// +kubebuilder:validation:Enum=None;V1;V2
type ProxyProtocol string

const (
	// ProxyProtocolNone sends no header: the backend sees connections coming
	// from a dataplane pod.
	ProxyProtocolNone ProxyProtocol = "None"
	// ProxyProtocolV1 sends the text header, such as
	// "PROXY TCP4 203.0.113.7 10.96.0.10 51234 80\r\n".
	ProxyProtocolV1 ProxyProtocol = "V1"
	// ProxyProtocolV2 sends the binary header.
	ProxyProtocolV2 ProxyProtocol = "V2"
)

// Frontend is where clients connect (Azure: the frontend IP configuration and
// frontend port). Rules with the same frontend name in a namespace share one
// frontend address.
type Frontend struct {
	// Name of the frontend. Rules in one namespace with the same name share a
	// frontend Service and so one address.
	// +kubebuilder:default=default
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=50
	// +kubebuilder:validation:Pattern=`^[a-z]([-a-z0-9]*[a-z0-9])?$`
	// +optional
	Name string `json:"name,omitempty"`

	// Port clients connect to.
	// +required
	Port PortNumber `json:"port"`

	// ServiceType of the frontend Service: ClusterIP, NodePort or LoadBalancer.
	// NodePort and LoadBalancer use externalTrafficPolicy Local so that the
	// client's IP reaches the dataplane.
	// +kubebuilder:default=ClusterIP
	// +optional
	ServiceType ServiceType `json:"serviceType,omitempty"`
}

// BackendPool is the set of backends a rule spreads clients over: either the
// endpoints of a Service or a static list of IPs (Azure's IP-based pool).
// +kubebuilder:validation:XValidation:rule="has(self.serviceName) != has(self.addresses)",message="exactly one of spec.backendPool.serviceName or spec.backendPool.addresses must be set"
type BackendPool struct {
	// ServiceName is a Service in the rule's namespace; its ready endpoints
	// (from its EndpointSlices) form the pool.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[a-z]([-a-z0-9]*[a-z0-9])?$`
	// +optional
	ServiceName string `json:"serviceName,omitempty"`

	// Addresses is a static pool of backend IPs (IPv4 or IPv6, canonical form,
	// no duplicates).
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=1000
	// +kubebuilder:validation:items:MaxLength=45
	// +kubebuilder:validation:items:XValidation:rule="isIP(self) && ip.isCanonical(self) && (ip(self).isGlobalUnicast() || ip(self).isLoopback())",message="spec.backendPool.addresses: each entry must be a unicast IPv4 or IPv6 address in canonical form, such as 10.0.0.4 or fd00::4"
	// +listType=set
	// +optional
	Addresses []string `json:"addresses,omitempty"`
}

// Probe is Azure's health probe: an active check, on top of Kubernetes
// readiness, that takes a failing backend out of rotation.
// +kubebuilder:validation:XValidation:rule="self.protocol == 'TCP' || has(self.requestPath)",message="spec.probe.requestPath is required when spec.probe.protocol is HTTP or HTTPS",fieldPath=".requestPath"
// +kubebuilder:validation:XValidation:rule="self.protocol != 'TCP' || !has(self.requestPath)",message="spec.probe.requestPath must not be set when spec.probe.protocol is TCP",fieldPath=".requestPath"
type Probe struct {
	// Protocol of the probe: TCP (connect), HTTP or HTTPS (GET requestPath,
	// pass only on 200).
	// +required
	Protocol ProbeProtocol `json:"protocol"`

	// Port probed on each backend. Defaults to spec.backendPort.
	// +optional
	Port *PortNumber `json:"port,omitempty"`

	// RequestPath for HTTP and HTTPS probes, such as /healthz.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=1024
	// +kubebuilder:validation:Pattern=`^/[^\s]*$`
	// +optional
	RequestPath string `json:"requestPath,omitempty"`

	// IntervalInSeconds between probes of one backend. Each probe times out
	// after min(interval, 30s).
	// +kubebuilder:default=15
	// +kubebuilder:validation:Minimum=5
	// +kubebuilder:validation:Maximum=3600
	// +optional
	IntervalInSeconds int32 `json:"intervalInSeconds,omitempty"`

	// ProbeThreshold is how many consecutive results of the other kind flip a
	// backend up or down.
	// +kubebuilder:default=1
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	// +optional
	ProbeThreshold int32 `json:"probeThreshold,omitempty"`
}

// LoadBalancerRuleSpec is one Azure-style load-balancing rule: a frontend
// port, a backend pool and port, and how clients are pinned.
// +kubebuilder:validation:XValidation:rule="!(self.protocol == 'UDP' && self.enableTcpReset)",message="spec.enableTcpReset applies to TCP flows and cannot be true when spec.protocol is UDP",fieldPath=".enableTcpReset"
// +kubebuilder:validation:XValidation:rule="self.sessionPersistence != 'None' || !has(self.sessionPersistenceTimeoutInMinutes) || self.sessionPersistenceTimeoutInMinutes == 0",message="spec.sessionPersistenceTimeoutInMinutes applies to ClientIP and ClientIPProtocol and must be unset or 0 when spec.sessionPersistence is None",fieldPath=".sessionPersistenceTimeoutInMinutes"
// +kubebuilder:validation:XValidation:rule="!(self.protocol == 'UDP' && self.proxyProtocol != 'None')",message="spec.proxyProtocol applies to TCP flows and must be None when spec.protocol is UDP",fieldPath=".proxyProtocol"
type LoadBalancerRuleSpec struct {
	// Frontend clients connect to.
	// +required
	Frontend Frontend `json:"frontend"`

	// BackendPool the rule spreads clients over.
	// +required
	BackendPool BackendPool `json:"backendPool"`

	// BackendPort on each backend.
	// +required
	BackendPort PortNumber `json:"backendPort"`

	// Protocol balanced: TCP, UDP, or All (TCP and UDP on the same port).
	// +kubebuilder:default=TCP
	// +optional
	Protocol Protocol `json:"protocol,omitempty"`

	// SessionPersistence: None (5-tuple), ClientIP (client IP + frontend) or
	// ClientIPProtocol (client IP + frontend + protocol).
	// +kubebuilder:default=None
	// +optional
	SessionPersistence SessionPersistence `json:"sessionPersistence,omitempty"`

	// SessionPersistenceTimeoutInMinutes is how long a client stays pinned to
	// its backend after its last flow ends, under ClientIP and
	// ClientIPProtocol. A pinned client keeps its backend, on every dataplane
	// replica, while that backend takes new flows: adding backends to the
	// pool does not move it. Unset means 180 (three hours, as kube-proxy's
	// ClientIP affinity). 0 keeps no pins, as Azure does: each new flow goes
	// where the current pool sends the client, so a change to the pool may
	// move it. Must be unset or 0 when sessionPersistence is None.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1440
	// +optional
	SessionPersistenceTimeoutInMinutes *int32 `json:"sessionPersistenceTimeoutInMinutes,omitempty"`

	// IdleTimeoutInMinutes after which an idle TCP flow is closed.
	// +kubebuilder:default=4
	// +kubebuilder:validation:Minimum=4
	// +kubebuilder:validation:Maximum=100
	// +optional
	IdleTimeoutInMinutes int32 `json:"idleTimeoutInMinutes,omitempty"`

	// EnableTcpReset sends a RST to both sides on idle timeout instead of
	// closing silently.
	// +kubebuilder:default=false
	// +optional
	EnableTcpReset bool `json:"enableTcpReset"`

	// Probe is an optional active health check of each backend.
	// +optional
	Probe *Probe `json:"probe,omitempty"`

	// NoHealthyBackendsBehavior when every probed backend is down:
	// AllProbedDown refuses new flows, AllProbedUp sends to all backends.
	// +kubebuilder:default=AllProbedDown
	// +optional
	NoHealthyBackendsBehavior NoHealthyBackendsBehavior `json:"noHealthyBackendsBehavior,omitempty"`

	// ProxyProtocol sends a PROXY protocol header (HAProxy's specification)
	// to the backend before any client byte, so that the backend sees the
	// client's address and port as the source of the connection and the
	// frontend address and port the client connected to as its destination:
	// None (no header), V1 (text) or V2 (binary). The backend must expect
	// the header; one that does not reads it as the start of the client's
	// data. It applies to TCP flows only: it must be None when protocol is
	// UDP, and with All only the TCP flows carry the header while UDP
	// datagrams are forwarded unchanged. The rule's health probes send a
	// header too, without client information (V2 with the LOCAL command, V1
	// "PROXY UNKNOWN"), before the HTTP request and before the TLS handshake,
	// so that a backend that requires the header passes its probe.
	// +kubebuilder:default=None
	// +optional
	ProxyProtocol ProxyProtocol `json:"proxyProtocol,omitempty"`
}

// FrontendStatus is where clients reach the rule.
type FrontendStatus struct {
	// Addresses of the frontend (the frontend Service's cluster and load
	// balancer IPs, or the dataplane's bind address when run outside a cluster).
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MaxLength=64
	// +listType=atomic
	// +optional
	Addresses []string `json:"addresses,omitempty"`
}

// BackendCounts counts the rule's backends.
type BackendCounts struct {
	// Total backends in the pool, ready or not.
	Total int32 `json:"total"`
	// Ready backends: Kubernetes says they are ready (always all of an
	// IP-based pool).
	Ready int32 `json:"ready"`
	// Healthy backends: ready and passing the probe (equal to Ready without a probe).
	Healthy int32 `json:"healthy"`
}

// LoadBalancerRuleStatus is what the controller observed and did.
type LoadBalancerRuleStatus struct {
	// ObservedGeneration is the spec generation this status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Conditions: Accepted, ResolvedRefs, Programmed and Ready.
	// +kubebuilder:validation:MaxItems=8
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// Frontend addresses clients can connect to.
	// +optional
	Frontend FrontendStatus `json:"frontend,omitempty"`

	// Backends counts the pool's backends.
	// +optional
	Backends BackendCounts `json:"backends,omitempty"`
}

// LoadBalancerRule balances a frontend port over a pool of backends, pinning
// clients as Azure Load Balancer's session persistence does.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=lbr,categories=stickylb
// +kubebuilder:printcolumn:name="Protocol",type=string,JSONPath=`.spec.protocol`
// +kubebuilder:printcolumn:name="Port",type=integer,JSONPath=`.spec.frontend.port`
// +kubebuilder:printcolumn:name="Persistence",type=string,JSONPath=`.spec.sessionPersistence`
// +kubebuilder:printcolumn:name="Healthy",type=integer,JSONPath=`.status.backends.healthy`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type LoadBalancerRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +required
	Spec LoadBalancerRuleSpec `json:"spec"`

	// +optional
	Status LoadBalancerRuleStatus `json:"status,omitempty"`
}

// LoadBalancerRuleList is a list of LoadBalancerRules.
//
// +kubebuilder:object:root=true
type LoadBalancerRuleList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []LoadBalancerRule `json:"items"`
}

func init() {
	SchemeBuilder.Register(&LoadBalancerRule{}, &LoadBalancerRuleList{})
}
