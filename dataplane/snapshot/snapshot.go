// Package snapshot holds the dataplane's configuration: an immutable,
// versioned description of every rule the proxy serves. A Snapshot is built
// off the hot path (by translate, from Kubernetes objects or a rules file),
// published with an atomic pointer swap, and never modified afterwards.
//
// It depends on the standard library only, so that every layer can share it.
package snapshot

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Protocol is a transport protocol, numbered as IANA does (the number is part
// of the ClientIPProtocol hash key).
type Protocol uint8

const (
	TCP Protocol = 6
	UDP Protocol = 17
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// Persistence is Azure's session persistence: which part of a flow is hashed
// to pick its backend.
type Persistence uint8

const (
	// PersistenceNone hashes the 5-tuple.
	PersistenceNone Persistence = iota
	// PersistenceClientIP hashes client IP + frontend.
	PersistenceClientIP
	// PersistenceClientIPProtocol hashes client IP + frontend + protocol.
	PersistenceClientIPProtocol
)

func (p Persistence) String() string {
	return [...]string{"None", "ClientIP", "ClientIPProtocol"}[p]
}

// ProxyProtocol is the PROXY protocol header (HAProxy's
// doc/proxy-protocol.txt) the proxy sends to a backend before any client
// byte, on TCP flows and on the rule's health probes.
type ProxyProtocol uint8

const (
	// ProxyNone sends no header.
	ProxyNone ProxyProtocol = iota
	// ProxyV1 sends the text header ("PROXY TCP4 ...\r\n").
	ProxyV1
	// ProxyV2 sends the binary header.
	ProxyV2
)

func (p ProxyProtocol) String() string {
	switch p {
	case ProxyNone:
		return "None"
	case ProxyV1:
		return "V1"
	case ProxyV2:
		return "V2"
	}
	return fmt.Sprintf("proxy-%d", uint8(p))
}

// ProbeProtocol is how a backend is actively checked.
type ProbeProtocol string

const (
	ProbeTCP   ProbeProtocol = "TCP"
	ProbeHTTP  ProbeProtocol = "HTTP"
	ProbeHTTPS ProbeProtocol = "HTTPS"
)

// Probe is a rule's active health check, defaults applied.
type Probe struct {
	Protocol  ProbeProtocol
	Port      uint16
	Path      string
	Interval  time.Duration
	Threshold int
}

// Backend is one endpoint of a rule's pool.
type Backend struct {
	Addr netip.AddrPort
	// Draining backends take no new flows; their established flows continue
	// (Kubernetes: a terminating endpoint).
	Draining bool
}

// Rule is one listener's worth of configuration: a frontend port serving one
// or both transport protocols over a pool.
type Rule struct {
	// Name identifies the rule ("namespace/name"); it labels metrics.
	Name string
	// Generation of the rule object this was built from.
	Generation int64
	// Frontend identifies the frontend ("namespace/frontend-name"). It is part
	// of the ClientIP hash key, so rules on one frontend with the same pool pin
	// a client to the same backend over TCP and UDP.
	Frontend string
	// Bind is the address the listener binds, Port the frontend port.
	Bind netip.Addr
	Port uint16
	// Protocols served: TCP, UDP or both (Azure "All"), sorted.
	Protocols   []Protocol
	Persistence Persistence
	// IdleTimeout closes TCP flows and expires UDP sessions with no traffic.
	IdleTimeout time.Duration
	// TCPReset sends RST to both sides on idle timeout.
	TCPReset bool
	// Probe is nil when the rule has no active health check.
	Probe *Probe
	// PinTimeout is how long a client's pin outlives its last flow
	// (sessionPersistenceTimeoutInMinutes). 0 keeps no pins: a client's
	// backend is the table's pick, recomputed on every pool change (Azure).
	// Only ClientIP and ClientIPProtocol rules pin.
	PinTimeout time.Duration
	// ProxyProtocol is the PROXY protocol header sent to backends on TCP
	// flows and probes; UDP flows never carry one.
	ProxyProtocol ProxyProtocol
	// AllProbedUp: when every probed backend is down, send to all of them
	// (Azure's noHealthyBackendsBehavior AllProbedUp) instead of refusing.
	AllProbedUp bool
	// Backends sorted by address; no duplicates.
	Backends []Backend
}

// Serves reports whether the rule listens on p.
func (r *Rule) Serves(p Protocol) bool { return slices.Contains(r.Protocols, p) }

// Snapshot is everything the proxy serves at one version.
type Snapshot struct {
	Version uint64
	// Rules sorted by Name.
	Rules []Rule
}

// ListenerKey identifies one listening socket.
type ListenerKey struct {
	Addr     netip.AddrPort
	Protocol Protocol
}

func (k ListenerKey) String() string { return k.Protocol.String() + "/" + k.Addr.String() }

// Normalize sorts rules, protocols and backends and drops duplicate backends,
// so that equal configurations compare equal and build identical tables.
func (s *Snapshot) Normalize() {
	slices.SortFunc(s.Rules, func(a, b Rule) int { return cmp.Compare(a.Name, b.Name) })
	for i := range s.Rules {
		s.Rules[i].Normalize()
	}
}

// Normalize sorts the rule's protocols and backends and drops duplicate
// backends, in place: call it before the rule is shared (a snapshot's rules
// are read concurrently, and a rule may be shared by several snapshots).
func (r *Rule) Normalize() {
	slices.Sort(r.Protocols)
	r.Protocols = slices.Compact(r.Protocols)
	slices.SortFunc(r.Backends, func(a, b Backend) int {
		if c := a.Addr.Compare(b.Addr); c != 0 {
			return c
		}
		// A ready copy of a backend wins over a draining one.
		return cmp.Compare(boolInt(a.Draining), boolInt(b.Draining))
	})
	r.Backends = slices.CompactFunc(r.Backends, func(a, b Backend) bool { return a.Addr == b.Addr })
}

// Equal reports whether two rules hold the same configuration. It is cheap
// for rules that share their backends (the same backing array and length,
// as incremental translation leaves the rules it did not rebuild: a
// snapshot is immutable, so shared backends are equal), and otherwise
// compares the backends one by one. Nil and empty lists are equal.
func (r *Rule) Equal(o *Rule) bool {
	if r == o {
		return true
	}
	if r.Name != o.Name || r.Generation != o.Generation || r.Frontend != o.Frontend ||
		r.Bind != o.Bind || r.Port != o.Port || r.Persistence != o.Persistence ||
		r.IdleTimeout != o.IdleTimeout || r.TCPReset != o.TCPReset || r.PinTimeout != o.PinTimeout ||
		r.ProxyProtocol != o.ProxyProtocol || r.AllProbedUp != o.AllProbedUp ||
		!slices.Equal(r.Protocols, o.Protocols) || len(r.Backends) != len(o.Backends) {
		return false
	}
	if (r.Probe == nil) != (o.Probe == nil) || (r.Probe != nil && *r.Probe != *o.Probe) {
		return false
	}
	if len(r.Backends) == 0 || &r.Backends[0] == &o.Backends[0] {
		return true
	}
	return slices.Equal(r.Backends, o.Backends)
}

// Validate reports configurations the proxy cannot serve: two rules claiming
// one listener, or a rule without a port or protocol.
func (s *Snapshot) Validate() error {
	owner := map[ListenerKey]string{}
	for i := range s.Rules {
		r := &s.Rules[i]
		if r.Port == 0 || len(r.Protocols) == 0 || !r.Bind.IsValid() {
			return fmt.Errorf("rule %s: needs a bind address, a port and a protocol", r.Name)
		}
		for _, k := range r.Listeners() {
			if prev, ok := owner[k]; ok {
				return fmt.Errorf("rules %s and %s both listen on %s", prev, r.Name, k)
			}
			owner[k] = r.Name
		}
	}
	return nil
}

// Listeners are the sockets the rule needs.
func (r *Rule) Listeners() []ListenerKey {
	keys := make([]ListenerKey, 0, len(r.Protocols))
	for _, p := range r.Protocols {
		keys = append(keys, ListenerKey{Addr: netip.AddrPortFrom(r.Bind, r.Port), Protocol: p})
	}
	return keys
}

// Rule returns the rule with the given name.
func (s *Snapshot) Rule(name string) (*Rule, bool) {
	i, ok := slices.BinarySearchFunc(s.Rules, name, func(r Rule, n string) int { return cmp.Compare(r.Name, n) })
	if !ok {
		return nil, false
	}
	return &s.Rules[i], true
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
