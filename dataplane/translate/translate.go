// Package translate turns LoadBalancerRules and the Services and
// EndpointSlices they refer to into the dataplane's Snapshot, and tells for
// each rule whether it was accepted and how many backends it has.
//
// Translate is pure: the same objects, in any order, give the same
// Snapshot. Incremental gives the same outcome one change at a time,
// translating again only the rules a change feeds.
package translate

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Defaults of the API, for rules that were not defaulted by an API server
// (zero values mean "not set").
const (
	defaultFrontendName  = "default"
	defaultIdleTimeout   = 4 * time.Minute
	defaultProbeInterval = 15 * time.Second
	defaultProbeRetries  = 1

	// maxPinTimeoutMinutes is the schema's maximum of
	// spec.sessionPersistenceTimeoutInMinutes (one day).
	maxPinTimeoutMinutes = 1440
)

// Input is everything a Snapshot is built from.
type Input struct {
	Rules []v1alpha1.LoadBalancerRule
	// Services tell whether a rule's backend Service exists.
	Services []corev1.Service
	// Slices are EndpointSlices of any Services; a slice belongs to the
	// Service named by its kubernetes.io/service-name label in its namespace.
	Slices []discoveryv1.EndpointSlice
	// Bind is the address every listener binds: the pod IP, or 127.0.0.1 for
	// a local run. It must be valid.
	Bind netip.Addr
	// Version of the Snapshot.
	Version uint64
}

// Result is what translation found out about one rule.
type Result struct {
	// Accepted is false when the rule cannot be served: it lost its
	// listener to an older rule (ConflictWith) or its spec is unusable
	// (Invalid). Rules that are not accepted are not in the Snapshot.
	Accepted bool
	// ConflictWith is the "namespace/name" of the rule that holds the
	// listener this rule asked for, ConflictOn that listener.
	ConflictWith string
	ConflictOn   snapshot.ListenerKey
	// Invalid says which field makes the spec unusable, for specs the API
	// server did not validate (such as ones built in code).
	Invalid string
	// ResolvedRefs is false when the backend Service does not exist; the rule
	// is then served with no backends (it listens and refuses).
	ResolvedRefs bool
	// Total endpoints in the pool, Ready the ones Kubernetes calls ready
	// (every address of an IP-based pool).
	Total, Ready int32
}

// Translate builds the Snapshot the dataplane serves from in, and the result
// for every rule. The Snapshot is normalized and passes Validate.
//
// Two rules may not share a listener (bind address, port, transport
// protocol; "All" needs both): the older rule by creationTimestamp wins,
// ties going to the smaller namespace/name. It panics if in.Bind is not a
// valid address: that is a wiring mistake, not a property of the objects.
func Translate(in Input) (snapshot.Snapshot, map[types.NamespacedName]Result) {
	if !in.Bind.IsValid() {
		panic("translate: Input.Bind is not a valid address")
	}
	pools := indexPools(in.Services, in.Slices)
	rules := uniqueRules(in.Rules)
	results := make(map[types.NamespacedName]Result, len(rules))
	snap := snapshot.Snapshot{Version: in.Version}

	// Claim listeners oldest first; a rule that loses one claims none.
	slices.SortFunc(rules, olderFirst)
	owners := map[snapshot.ListenerKey]string{}
	for i := range rules {
		lbr := &rules[i]
		key := nameOf(lbr)
		rule, res := translateRule(lbr, in.Bind, func(k serviceKey) *pool { return pools[k] })
		if res.Invalid != "" {
			results[key] = res
			continue
		}
		listeners := rule.Listeners()
		for _, l := range listeners {
			if owner, taken := owners[l]; taken {
				res.ConflictWith, res.ConflictOn = owner, l
				break
			}
		}
		if res.ConflictWith != "" {
			results[key] = res
			continue
		}
		for _, l := range listeners {
			owners[l] = rule.Name
		}
		res.Accepted = true
		results[key] = res
		snap.Rules = append(snap.Rules, rule)
	}
	snap.Normalize()
	if err := snap.Validate(); err != nil {
		// Listeners are claimed above and every rule has a bind address, a
		// port and a protocol, so this is a bug here.
		panic(fmt.Sprintf("translate: built an invalid snapshot: %v", err))
	}
	return snap, results
}

// FromRules builds the Snapshot of the standalone proxy, which runs without a
// cluster: every rule needs an IP-based pool, and the rules must not compete
// for a listener (a rules file either works as a whole or is refused).
func FromRules(rules []v1alpha1.LoadBalancerRule, bind netip.Addr, version uint64) (snapshot.Snapshot, error) {
	if !bind.IsValid() {
		return snapshot.Snapshot{}, errors.New("no bind address")
	}
	var errs []error
	seen := map[types.NamespacedName]bool{}
	for i := range rules {
		r := &rules[i]
		key := nameOf(r)
		if seen[key] {
			errs = append(errs, fmt.Errorf("rule %s is defined twice", key))
		}
		seen[key] = true
		if r.Spec.BackendPool.ServiceName != "" {
			errs = append(errs, fmt.Errorf("rule %s: spec.backendPool.serviceName: Invalid value: %q: the standalone proxy has no cluster to find Services in; list the backends in spec.backendPool.addresses", key, r.Spec.BackendPool.ServiceName))
		}
	}
	if len(errs) > 0 {
		return snapshot.Snapshot{}, errors.Join(errs...)
	}
	snap, results := Translate(Input{Rules: rules, Bind: bind, Version: version})
	keys := make([]types.NamespacedName, 0, len(results))
	for k := range results {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, compareNames)
	for _, k := range keys {
		switch res := results[k]; {
		case res.Invalid != "":
			errs = append(errs, fmt.Errorf("rule %s: %s", k, res.Invalid))
		case res.ConflictWith != "":
			errs = append(errs, fmt.Errorf("rules %s and %s both listen on %s", res.ConflictWith, k, res.ConflictOn))
		}
	}
	if len(errs) > 0 {
		return snapshot.Snapshot{}, errors.Join(errs...)
	}
	return snap, nil
}

// translateRule builds the snapshot rule of r. A spec the dataplane cannot
// serve comes back as res.Invalid.
func translateRule(r *v1alpha1.LoadBalancerRule, bind netip.Addr, pools func(serviceKey) *pool) (snapshot.Rule, Result) {
	spec := &r.Spec
	ns := namespace(r)
	invalid := func(format string, args ...any) (snapshot.Rule, Result) {
		return snapshot.Rule{}, Result{Invalid: fmt.Sprintf(format, args...)}
	}

	port, ok := portNumber(spec.Frontend.Port)
	if !ok {
		return invalid("spec.frontend.port: Invalid value: %d: must be between 1 and 65535", spec.Frontend.Port)
	}
	backendPort, ok := portNumber(spec.BackendPort)
	if !ok {
		return invalid("spec.backendPort: Invalid value: %d: must be between 1 and 65535", spec.BackendPort)
	}
	var protocols []snapshot.Protocol
	switch spec.Protocol {
	case v1alpha1.ProtocolTCP, "":
		protocols = []snapshot.Protocol{snapshot.TCP}
	case v1alpha1.ProtocolUDP:
		protocols = []snapshot.Protocol{snapshot.UDP}
	case v1alpha1.ProtocolAll:
		protocols = []snapshot.Protocol{snapshot.TCP, snapshot.UDP}
	default:
		return invalid("spec.protocol: Unsupported value: %q", spec.Protocol)
	}
	var persistence snapshot.Persistence
	switch spec.SessionPersistence {
	case v1alpha1.SessionPersistenceNone, "":
		persistence = snapshot.PersistenceNone
	case v1alpha1.SessionPersistenceClientIP:
		persistence = snapshot.PersistenceClientIP
	case v1alpha1.SessionPersistenceClientIPProtocol:
		persistence = snapshot.PersistenceClientIPProtocol
	default:
		return invalid("spec.sessionPersistence: Unsupported value: %q", spec.SessionPersistence)
	}
	pinTimeout, msg := translatePinTimeout(spec.SessionPersistenceTimeoutInMinutes, persistence)
	if msg != "" {
		return invalid("%s", msg)
	}
	proxyProtocol, msg := translateProxyProtocol(spec.ProxyProtocol, spec.Protocol)
	if msg != "" {
		return invalid("%s", msg)
	}
	idle := defaultIdleTimeout
	if spec.IdleTimeoutInMinutes > 0 {
		idle = time.Duration(spec.IdleTimeoutInMinutes) * time.Minute
	}
	probe, msg := translateProbe(spec.Probe, backendPort)
	if msg != "" {
		return invalid("%s", msg)
	}
	frontend := spec.Frontend.Name
	if frontend == "" {
		frontend = defaultFrontendName
	}

	rule := snapshot.Rule{
		Name:        ns + "/" + r.Name,
		Generation:  r.Generation,
		Frontend:    ns + "/" + frontend,
		Bind:        bind,
		Port:        port,
		Protocols:   protocols,
		Persistence: persistence,
		PinTimeout:  pinTimeout,
		IdleTimeout: idle,
		TCPReset:    spec.EnableTcpReset,
		Probe:       probe,
		AllProbedUp: spec.NoHealthyBackendsBehavior == v1alpha1.AllProbedUp,

		ProxyProtocol: proxyProtocol,
	}
	res := Result{ResolvedRefs: true}
	switch pool := spec.BackendPool; {
	case pool.ServiceName != "" && len(pool.Addresses) > 0:
		return invalid("spec.backendPool: Invalid value: exactly one of spec.backendPool.serviceName or spec.backendPool.addresses must be set")
	case pool.ServiceName != "":
		p := pools(serviceKey{namespace: ns, name: pool.ServiceName})
		if p == nil || !p.exists {
			// Served with no backends: clients are refused, not sent elsewhere.
			res.ResolvedRefs = false
			break
		}
		rule.Backends, res.Total, res.Ready = p.backends(backendPort)
	case len(pool.Addresses) > 0:
		for i, a := range pool.Addresses {
			addr, err := netip.ParseAddr(a)
			if err != nil || addr.Zone() != "" {
				return invalid("spec.backendPool.addresses[%d]: Invalid value: %q: must be an IP address", i, a)
			}
			rule.Backends = append(rule.Backends, snapshot.Backend{Addr: netip.AddrPortFrom(addr.Unmap(), backendPort)})
		}
		slices.SortFunc(rule.Backends, func(a, b snapshot.Backend) int { return a.Addr.Compare(b.Addr) })
		rule.Backends = slices.Compact(rule.Backends)
		res.Total = int32(len(rule.Backends))
		res.Ready = res.Total
	default:
		return invalid("spec.backendPool: Required value: exactly one of spec.backendPool.serviceName or spec.backendPool.addresses must be set")
	}
	return rule, res
}

// translatePinTimeout is how long a client's pin outlives its last flow:
// none under None, else spec.sessionPersistenceTimeoutInMinutes, 180 minutes
// when unset. The API server refuses the values it reports; they come only
// from rules built in code.
func translatePinTimeout(minutes *int32, persistence snapshot.Persistence) (time.Duration, string) {
	if minutes == nil {
		if persistence == snapshot.PersistenceNone {
			return 0, ""
		}
		return time.Duration(v1alpha1.DefaultSessionPersistenceTimeoutInMinutes) * time.Minute, ""
	}
	m := *minutes
	switch {
	case m < 0 || m > maxPinTimeoutMinutes:
		return 0, fmt.Sprintf("spec.sessionPersistenceTimeoutInMinutes: Invalid value: %d: must be between 0 and %d", m, maxPinTimeoutMinutes)
	case persistence == snapshot.PersistenceNone && m > 0:
		return 0, fmt.Sprintf("spec.sessionPersistenceTimeoutInMinutes: Invalid value: %d: applies to ClientIP and ClientIPProtocol and must be unset or 0 when spec.sessionPersistence is None", m)
	}
	return time.Duration(m) * time.Minute, ""
}

// translateProxyProtocol is the PROXY protocol header sent to backends, none
// when spec.proxyProtocol is unset. It applies to TCP flows: with All only
// the TCP flows carry it, and with UDP alone it must be None. The API server
// refuses the values it reports; they come only from rules built in code.
func translateProxyProtocol(p v1alpha1.ProxyProtocol, protocol v1alpha1.Protocol) (snapshot.ProxyProtocol, string) {
	var out snapshot.ProxyProtocol
	switch p {
	case v1alpha1.ProxyProtocolNone, "":
		return snapshot.ProxyNone, ""
	case v1alpha1.ProxyProtocolV1:
		out = snapshot.ProxyV1
	case v1alpha1.ProxyProtocolV2:
		out = snapshot.ProxyV2
	default:
		return snapshot.ProxyNone, fmt.Sprintf("spec.proxyProtocol: Unsupported value: %q: supported values: \"None\", \"V1\", \"V2\"", p)
	}
	if protocol == v1alpha1.ProtocolUDP {
		return snapshot.ProxyNone, fmt.Sprintf("spec.proxyProtocol: Invalid value: %q: applies to TCP flows and must be None when spec.protocol is UDP", p)
	}
	return out, ""
}

func translateProbe(p *v1alpha1.Probe, backendPort uint16) (*snapshot.Probe, string) {
	if p == nil {
		return nil, ""
	}
	out := &snapshot.Probe{
		Port:      backendPort,
		Path:      p.RequestPath,
		Interval:  defaultProbeInterval,
		Threshold: defaultProbeRetries,
	}
	switch p.Protocol {
	case v1alpha1.ProbeProtocolTCP:
		out.Protocol = snapshot.ProbeTCP
		out.Path = ""
	case v1alpha1.ProbeProtocolHTTP, v1alpha1.ProbeProtocolHTTPS:
		out.Protocol = snapshot.ProbeProtocol(p.Protocol)
		if !strings.HasPrefix(p.RequestPath, "/") {
			return nil, fmt.Sprintf("spec.probe.requestPath: Invalid value: %q: must start with /", p.RequestPath)
		}
	default:
		return nil, fmt.Sprintf("spec.probe.protocol: Unsupported value: %q", p.Protocol)
	}
	if p.Port != nil {
		port, ok := portNumber(*p.Port)
		if !ok {
			return nil, fmt.Sprintf("spec.probe.port: Invalid value: %d: must be between 1 and 65535", *p.Port)
		}
		out.Port = port
	}
	if p.IntervalInSeconds > 0 {
		out.Interval = time.Duration(p.IntervalInSeconds) * time.Second
	}
	if p.ProbeThreshold > 0 {
		out.Threshold = int(p.ProbeThreshold)
	}
	return out, ""
}

func portNumber(p v1alpha1.PortNumber) (uint16, bool) {
	if p < 1 || p > 65535 {
		return 0, false
	}
	return uint16(p), true
}

func namespace(r *v1alpha1.LoadBalancerRule) string {
	if r.Namespace == "" {
		return "default"
	}
	return r.Namespace
}

// uniqueRules copies rules, keeping one rule per namespace/name (the highest
// generation) should a caller pass the same rule twice.
func uniqueRules(in []v1alpha1.LoadBalancerRule) []v1alpha1.LoadBalancerRule {
	out := slices.Clone(in)
	slices.SortFunc(out, func(a, b v1alpha1.LoadBalancerRule) int {
		return cmp.Or(
			compareNames(nameOf(&a), nameOf(&b)),
			cmp.Compare(b.Generation, a.Generation),
			cmp.Compare(a.UID, b.UID),
		)
	})
	return slices.CompactFunc(out, func(a, b v1alpha1.LoadBalancerRule) bool { return nameOf(&a) == nameOf(&b) })
}

// olderFirst orders rules by age, then by namespace/name.
func olderFirst(a, b v1alpha1.LoadBalancerRule) int {
	ta, tb := a.CreationTimestamp.Time, b.CreationTimestamp.Time
	if c := ta.Compare(tb); c != 0 {
		return c
	}
	return compareNames(nameOf(&a), nameOf(&b))
}

func nameOf(r *v1alpha1.LoadBalancerRule) types.NamespacedName {
	return types.NamespacedName{Namespace: namespace(r), Name: r.Name}
}

func compareNames(a, b types.NamespacedName) int {
	return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}
