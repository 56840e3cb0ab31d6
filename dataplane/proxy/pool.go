package proxy

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/stickylb/stickylb/dataplane/health"
	"github.com/stickylb/stickylb/dataplane/maglev"
	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/proxyheader"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// backend is one endpoint of a built pool, with its metric series resolved.
type backend struct {
	addr netip.AddrPort
	name string // addr.String(), the Maglev key and the metrics label
	// pinKey is what pins name the backend by: pins.BackendKey(name).
	pinKey uint64
	rule   string
	// sa is addr as connect(2) takes it; read-only, so every loop may use it.
	sa rawSockaddr

	// The backend's metric series are made on its first flow: a large pool
	// that sees little traffic should not cost eight series per endpoint.
	metrics     *metrics
	metricsOnce sync.Once
	series      *backendMetrics
}

// m returns the backend's metric series, creating them on first use.
func (b *backend) m() *backendMetrics {
	b.metricsOnce.Do(func() { b.series = b.metrics.forBackend(b.rule, b.name) })
	return b.series
}

// pool is what the hot path reads for a rule: an immutable Maglev table over
// the backends that take new flows, rebuilt off the hot path and published
// with an atomic pointer swap.
type pool struct {
	table *maglev.Table
	// picks holds the backends by table index; byPin the same by pin key.
	picks []*backend
	byPin map[uint64]*backend
	// alive is every backend whose established UDP sessions may continue:
	// present in the snapshot (draining included) and not probed down.
	alive map[netip.AddrPort]*backend
	// healthy counts the non-draining backends passing their probe (what
	// status.backends.healthy reports), even when AllProbedUp serves all;
	// active counts the non-draining backends, passing or not.
	healthy, active int
}

// pick returns the client's backend preference order (the primary first),
// at most n entries, or nil when the rule refuses new flows.
func (p *pool) pick(dst []*backend, hash uint64, n int) []*backend {
	if len(p.picks) == 0 {
		return dst
	}
	var idx [maxDialAttempts]int
	for _, i := range p.table.AppendPreference(idx[:0], hash, n) {
		dst = append(dst, p.picks[i])
	}
	return dst
}

// ruleState is a rule as served: its immutable configuration and its
// current pool. A configuration change makes a new ruleState; a probe
// transition only swaps the pool.
type ruleState struct {
	rule *snapshot.Rule
	m    *ruleMetrics
	pool atomic.Pointer[pool]
	// pins is the rule's pin table, nil when the rule does not pin; set
	// before the rule serves, and the same table for as long as the rule
	// pins its clients the same way.
	pins *pins.Table

	buildMu  sync.Mutex // serialises rebuilds; never held on the hot path
	backends map[netip.AddrPort]*backend
}

func newRuleState(r *snapshot.Rule, m *metrics) *ruleState {
	rs := &ruleState{rule: r, m: m.forRule(r.Name), backends: make(map[netip.AddrPort]*backend, len(r.Backends))}
	if r.ProxyProtocol != snapshot.ProxyNone {
		rs.m.headersWithData = m.headers.WithLabelValues(r.Name, "with")
		rs.m.headersAlone = m.headers.WithLabelValues(r.Name, "alone")
	}
	for _, b := range r.Backends {
		name := b.Addr.String()
		rs.backends[b.Addr] = &backend{addr: b.Addr, name: name, pinKey: pins.BackendKey(name), rule: r.Name, sa: newRawSockaddr(b.Addr), metrics: m}
	}
	return rs
}

// probeTarget is the health target of backend b under rule r, if r probes.
func probeTarget(r *snapshot.Rule, b netip.AddrPort) (health.Target, bool) {
	if r.Probe == nil {
		return health.Target{}, false
	}
	port := r.Probe.Port
	if port == 0 {
		port = b.Port()
	}
	return health.Target{Addr: b.Addr(), Spec: health.Spec{
		Protocol:    health.Protocol(r.Probe.Protocol),
		Port:        int(port),
		RequestPath: r.Probe.Path,
		Interval:    r.Probe.Interval,
		Threshold:   r.Probe.Threshold,
		ProxyHeader: proxyheader.Version(r.ProxyProtocol),
	}}, true
}

// rebuild builds and publishes the rule's pool from its backends and their
// current probe status.
func (rs *ruleState) rebuild(status func(health.Target) (up, known bool), m *metrics) {
	rs.buildMu.Lock()
	defer rs.buildMu.Unlock()
	r := rs.rule
	var active, healthy []*backend
	alive := make(map[netip.AddrPort]*backend, len(r.Backends))
	for _, sb := range r.Backends {
		b := rs.backends[sb.Addr]
		up := true
		if t, ok := probeTarget(r, sb.Addr); ok {
			if u, known := status(t); known {
				up = u
			}
			m.probeStatus.WithLabelValues(r.Name, b.name).Set(boolGauge(up))
		}
		if up {
			alive[sb.Addr] = b
		}
		if sb.Draining {
			continue
		}
		active = append(active, b)
		if up {
			healthy = append(healthy, b)
		}
	}
	picks := healthy
	if len(healthy) == 0 && r.AllProbedUp {
		// Azure's AllProbedUp: with every probe failing, trust none of them.
		picks = active
		for _, b := range active {
			alive[b.addr] = b
		}
	}
	names := make([]string, len(picks))
	for i, b := range picks {
		names[i] = b.name
	}
	// Rules with the same pool share one table; see tableCache.
	table, err := sharedTables.get(names, 0)
	if err != nil {
		// Only pools beyond maglev's size limit fail; serve none rather than a skewed table.
		table, _ = sharedTables.get(nil, 0)
		picks = nil
	}
	// The table sorts its keys; index picks the same way.
	byName := make(map[string]*backend, len(picks))
	for _, b := range picks {
		byName[b.name] = b
	}
	sorted := make([]*backend, table.Len())
	byPin := make(map[uint64]*backend, len(sorted))
	for i := range sorted {
		sorted[i] = byName[table.Backend(i)]
		byPin[sorted[i].pinKey] = sorted[i]
	}
	rs.pool.Store(&pool{table: table, picks: sorted, byPin: byPin, alive: alive, healthy: len(healthy), active: len(active)})
	rs.m.rebuilds.Inc()
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
