package proxy

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/health"
	"github.com/stickylb/stickylb/dataplane/maglev"
	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/proxyheader"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// backend is one endpoint of a rule as served. A rule keeps its backends in
// one slice, sorted by pin key, and pools point into it: at 10,000 rules of
// 100 endpoints every byte here is a megabyte. What can be derived is not
// stored: the rule's name comes from rs, the address's text (the metrics
// label and the pin key's input) is made where it is needed, off the hot
// path, and the kernel's sockaddr is made on the stack at each connect.
type backend struct {
	addr netip.AddrPort
	// pinKey is what pins name the backend by: pins.BackendKey of addr's text.
	pinKey uint64
	rs     *ruleState
	// series are the backend's metric series, made on its first flow: a
	// large pool that sees little traffic should not cost eight series per
	// endpoint.
	series atomic.Pointer[backendMetrics]
}

// m returns the backend's metric series, creating them on first use.
func (b *backend) m() *backendMetrics {
	if s := b.series.Load(); s != nil {
		return s
	}
	return b.makeSeries()
}

// makeSeries resolves the backend's series. Two flows may race to it: the
// series are the same either way (the vectors hand out one series per label
// set), and the first pointer stored stays.
func (b *backend) makeSeries() *backendMetrics {
	s := b.rs.metrics.forBackend(b.rs.rule.Name, b.addr.String())
	if b.series.CompareAndSwap(nil, s) {
		return s
	}
	return b.series.Load()
}

// family is the socket family connect reaches the backend with.
func (b *backend) family() int {
	if b.addr.Addr().Is4() || b.addr.Addr().Is4In6() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// connect starts connecting fd to the backend.
func (b *backend) connect(fd int) error {
	sa := newRawSockaddr(b.addr)
	return sa.connect(fd)
}

// bitset is a set of small non-negative integers.
type bitset []uint64

func newBitset(n int) bitset { return make(bitset, (n+63)/64) }

func (s bitset) set(i int)      { s[i/64] |= 1 << (i % 64) }
func (s bitset) has(i int) bool { return s[i/64]&(1<<(i%64)) != 0 }

// pool is what the hot path reads for a rule: an immutable Maglev table over
// the backends that take new flows, rebuilt off the hot path and published
// with an atomic pointer swap.
type pool struct {
	table *maglev.Table
	// backends are the rule's (rs.backends), sorted by pin key; picks holds
	// the index in backends of each of the table's backends, by table index.
	backends []backend
	picks    []int32
	// taking is the set of backends the table holds (picks as a set); alive
	// is every backend whose established UDP sessions may continue: present
	// in the snapshot (draining included) and not probed down. Both are
	// indexed like backends.
	taking, alive bitset
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
		dst = append(dst, &p.backends[p.picks[i]])
	}
	return dst
}

// index is the position in backends of the backend with pin key key, or -1.
func (p *pool) index(key uint64) int {
	if i := searchPinKey(p.backends, key); i < len(p.backends) && p.backends[i].pinKey == key {
		return i
	}
	return -1
}

// searchPinKey is the first index in bs (sorted by pin key) whose pin key is
// not below key.
func searchPinKey(bs []backend, key uint64) int {
	lo, hi := 0, len(bs)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if bs[m].pinKey < key {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// byPin returns the backend with pin key key if it takes new flows, else nil.
func (p *pool) byPin(key uint64) *backend {
	if i := p.index(key); i >= 0 && p.taking.has(i) {
		return &p.backends[i]
	}
	return nil
}

// isAlive reports whether b, a backend of this rule or of an earlier
// configuration of it, is in this pool and not probed down: whether its
// established UDP sessions may continue.
func (p *pool) isAlive(b *backend) bool {
	i := p.index(b.pinKey)
	return i >= 0 && p.backends[i].addr == b.addr && p.alive.has(i)
}

// ruleState is a rule as served: its immutable configuration and its
// current pool. A configuration change makes a new ruleState; a probe
// transition only swaps the pool.
type ruleState struct {
	rule    *snapshot.Rule
	m       *ruleMetrics
	metrics *metrics
	pool    atomic.Pointer[pool]
	// pins is the rule's pin table, nil when the rule does not pin; set
	// before the rule serves, and the same table for as long as the rule
	// pins its clients the same way.
	pins *pins.Table

	buildMu sync.Mutex // serialises rebuilds; never held on the hot path
	// backends are the rule's distinct backends sorted by pin key, and
	// draining those of them that are terminating.
	backends []backend
	draining bitset
	// portKeys: two backends share an IP, so the table keys them by ip:port.
	portKeys bool
}

func newRuleState(r *snapshot.Rule, m *metrics) *ruleState {
	rs := &ruleState{rule: r, m: m.forRule(r.Name), metrics: m}
	if r.ProxyProtocol != snapshot.ProxyNone {
		rs.m.headersWithData = m.headers.WithLabelValues(r.Name, "with")
		rs.m.headersAlone = m.headers.WithLabelValues(r.Name, "alone")
	}
	type entry struct {
		key      uint64
		addr     netip.AddrPort
		draining bool
	}
	es := make([]entry, len(r.Backends))
	for i, sb := range r.Backends {
		es[i] = entry{pins.BackendKey(sb.Addr.String()), sb.Addr, sb.Draining}
	}
	slices.SortFunc(es, func(a, b entry) int {
		if c := cmp.Compare(a.key, b.key); c != 0 {
			return c
		}
		return a.addr.Compare(b.addr)
	})
	// A snapshot's rule has no duplicates; one built by hand may.
	es = slices.CompactFunc(es, func(a, b entry) bool { return a.addr == b.addr })
	rs.backends = make([]backend, len(es))
	rs.draining = newBitset(len(es))
	for i, e := range es {
		b := &rs.backends[i]
		b.addr, b.pinKey, b.rs = e.addr, e.key, rs
		if e.draining {
			rs.draining.set(i)
		}
	}
	rs.portKeys = sharesIP(r.Backends)
	return rs
}

// sharesIP reports whether two of bs have the same IP.
func sharesIP(bs []snapshot.Backend) bool {
	sorted := true
	for i := 1; i < len(bs) && sorted; i++ {
		// A snapshot's backends are sorted by address: neighbours tell.
		switch c := bs[i-1].Addr.Compare(bs[i].Addr); {
		case c >= 0:
			sorted = false
		case bs[i-1].Addr.Addr() == bs[i].Addr.Addr():
			return true
		}
	}
	if sorted {
		return false
	}
	ports := make(map[netip.Addr]uint16, len(bs))
	for _, b := range bs {
		if port, ok := ports[b.Addr.Addr()]; ok && port != b.Addr.Port() {
			return true
		}
		ports[b.Addr.Addr()] = b.Addr.Port()
	}
	return false
}

// find is the index in rs.backends of the backend at addr, or -1.
func (rs *ruleState) find(addr netip.AddrPort) int {
	key := pins.BackendKey(addr.String())
	i := searchPinKey(rs.backends, key)
	for ; i < len(rs.backends) && rs.backends[i].pinKey == key; i++ {
		if rs.backends[i].addr == addr {
			return i
		}
	}
	return -1
}

// tableKey is the key backend b has in the rule's Maglev table: its IP, not
// its port. Every backend of a rule translated from Kubernetes listens on
// the rule's backendPort, so the port tells the backends apart no better
// than the IP; keyed by IP, rules over the same pods on different ports (a
// Service's TCP and UDP rules, several ports of one app) have the same
// table, share it (tableCache), and send a client to the same pod on each
// of them. A rule with two backends at one IP (a rules file may have one)
// keys all its backends by ip:port. Pins name backends by ip:port either
// way (pinKey).
func (rs *ruleState) tableKey(b *backend) string {
	if rs.portKeys {
		return b.addr.String()
	}
	return b.addr.Addr().String()
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
	n := len(rs.backends)
	var active, healthy []int32
	alive := newBitset(n)
	for i := range rs.backends {
		b := &rs.backends[i]
		up := true
		if t, ok := probeTarget(r, b.addr); ok {
			if u, known := status(t); known {
				up = u
			}
			m.probeStatus.WithLabelValues(r.Name, b.addr.String()).Set(boolGauge(up))
		}
		if up {
			alive.set(i)
		}
		if rs.draining.has(i) {
			continue
		}
		active = append(active, int32(i))
		if up {
			healthy = append(healthy, int32(i))
		}
	}
	picks := healthy
	if len(healthy) == 0 && r.AllProbedUp {
		// Azure's AllProbedUp: with every probe failing, trust none of them.
		picks = active
		for _, i := range active {
			alive.set(int(i))
		}
	}
	// The table sorts its keys; order picks the same way.
	type keyed struct {
		key string
		i   int32
	}
	byKey := make([]keyed, len(picks))
	for j, i := range picks {
		byKey[j] = keyed{rs.tableKey(&rs.backends[i]), i}
	}
	slices.SortFunc(byKey, func(a, b keyed) int { return strings.Compare(a.key, b.key) })
	keys := make([]string, len(byKey))
	picks = make([]int32, len(byKey))
	for j, k := range byKey {
		keys[j], picks[j] = k.key, k.i
	}
	// Rules with the same pool share one table; see tableCache.
	table, err := sharedTables.get(keys, tableSize(r, len(keys)))
	if err != nil {
		// Only pools beyond maglev's size limit fail; serve none rather than a skewed table.
		table, _ = sharedTables.get(nil, 0)
		picks = nil
	}
	taking := newBitset(n)
	for _, i := range picks {
		taking.set(int(i))
	}
	rs.pool.Store(&pool{table: table, backends: rs.backends, picks: picks, taking: taking, alive: alive, healthy: len(healthy), active: len(active)})
	rs.m.rebuilds.Inc()
}

// tableSize is the Maglev size for a pool of n under rule r. A rule whose
// clients keep their backend through a pin after a pool change (pins on),
// or whose every connection is hashed anew (None), gets the compact size:
// Maglev's own disruption there only decides how many pins differ from the
// table. A rule that pins nothing but the table (ClientIP with a pin timeout
// of 0) keeps the automatic size, under 1% disruption.
func tableSize(r *snapshot.Rule, n int) uint64 {
	if r.PinTimeout == 0 && r.Persistence != snapshot.PersistenceNone {
		return 0
	}
	size, err := maglev.CompactSize(n)
	if err != nil {
		return 0 // beyond the ladder: Build explains
	}
	return size
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
