package proxy

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Pins keep a ClientIP or ClientIPProtocol client on the backend it got
// while that backend takes new flows and the client was active within the
// rule's PinTimeout, whatever the pool does around it. A client with no pin
// gets the table's pick and is pinned to it. A replica tells its peers
// (through PinSync) only the pins that differ from the table, which after a
// pool change are the few clients whose pick moved: every other pin is what
// every replica's table says anyway.

// PinSync carries pins to the other replicas.
type PinSync interface {
	// Announce hands over pins that differ from the table's pick for their
	// client; it must not block.
	Announce(rule string, ps []pins.Pin)
}

const (
	// pinSweepInterval is how often expired pins are dropped and the
	// overriding pins counted.
	pinSweepInterval = 10 * time.Second
	// pinRefreshInterval is how often overriding pins whose client had a
	// flow since are announced again, so that a peer's copy does not
	// expire while the client is active here.
	pinRefreshInterval = time.Minute
	// defaultPeerPinTimeout bounds the pins a peer sends for a rule this
	// replica does not serve yet (the API's default).
	defaultPeerPinTimeout = 180 * time.Minute
)

// pinState is the proxy's pin tables: one per rule that pins, kept across
// configuration changes of the rule, and one for each rule a peer sent pins
// for before this replica served it.
type pinState struct {
	lim pins.Limits

	mu     sync.Mutex
	tables map[string]*pins.Table
	// served are the rules being served that pin; unpinned those that do not.
	served   map[string]*ruleState
	unpinned map[string]bool
	// pending are the tables made for pins a peer sent before this replica
	// served their rule; the sweep forgets them once empty.
	pending map[string]bool

	sync        atomic.Pointer[PinSync]
	stop        chan struct{}
	lastRefresh uint32 // sweeper only

	refusedFull, refusedSource prometheus.Counter
}

func (ps *pinState) init(opts *Options, m *metrics) {
	ps.lim = pins.Limits{MaxPins: int64(opts.MaxPins), MaxPerSource: int32(opts.MaxPinsPerSource)}
	ps.tables = map[string]*pins.Table{}
	ps.served = map[string]*ruleState{}
	ps.unpinned = map[string]bool{}
	ps.pending = map[string]bool{}
	ps.stop = make(chan struct{})
	ps.refusedFull = m.pinsRefused.WithLabelValues("replica_limit")
	ps.refusedSource = m.pinsRefused.WithLabelValues("source_limit")
}

// pins reports whether the rule pins its clients.
func pinning(r *snapshot.Rule) bool {
	return r.PinTimeout > 0 && r.Persistence != snapshot.PersistenceNone
}

// SetPinSync makes the proxy announce pins through s.
func (p *Proxy) SetPinSync(s PinSync) { p.pins.sync.Store(&s) }

func (p *Proxy) announce(rule string, ps []pins.Pin) {
	if len(ps) == 0 {
		return
	}
	if s := p.pins.sync.Load(); s != nil {
		(*s).Announce(rule, ps)
	}
}

// attachPins gives the new states of a snapshot's changed rules their pin
// tables (replaced[i] is the state fresh[i] replaces, nil for a new rule);
// Apply calls it with p.mu held, before the pools are built. A rule that
// stops pinning, changes what its clients are keyed by, or is gone loses
// its pins. Rules that did not change keep their state and table.
func (p *Proxy) attachPins(fresh, replaced []*ruleState, gone []string) {
	ps := &p.pins
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for i, rs := range fresh {
		r, name := rs.rule, rs.rule.Name
		t := ps.tables[name]
		if old := replaced[i]; old != nil && t != nil && (old.rule.Persistence != r.Persistence || old.rule.Frontend != r.Frontend) {
			t.Clear() // the keys were another hash
		}
		if !pinning(r) {
			if t != nil {
				t.Clear()
				delete(ps.tables, name)
				delete(ps.pending, name)
			}
			continue
		}
		if t == nil {
			t = pins.New(r.PinTimeout, &ps.lim)
			ps.tables[name] = t
		}
		delete(ps.pending, name)
		t.SetTimeout(r.PinTimeout)
		rs.pins = t
	}
	for _, name := range gone {
		if t := ps.tables[name]; t != nil {
			t.Clear()
			delete(ps.tables, name)
		}
	}
}

// publishPins makes the new states of a snapshot's changed rules the
// served ones, and forgets the rules gone, for peers and the sweep; Apply
// calls it with p.mu held once every pool is built.
func (p *Proxy) publishPins(fresh []*ruleState, gone []string) {
	ps := &p.pins
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, name := range gone {
		delete(ps.served, name)
		delete(ps.unpinned, name)
	}
	for _, rs := range fresh {
		name := rs.rule.Name
		if rs.pins != nil {
			ps.served[name] = rs
			delete(ps.unpinned, name)
			continue
		}
		delete(ps.served, name)
		ps.unpinned[name] = true
		if t := ps.tables[name]; t != nil { // a peer's, since attachPins
			t.Clear()
			delete(ps.tables, name)
			delete(ps.pending, name)
		}
	}
}

// choose appends the client's backend preference order, at most n entries:
// its pinned backend first when it has one that takes new flows, then the
// table's order. A client with no usable pin gets the table's pick and is
// pinned to it.
func (p *Proxy) choose(rs *ruleState, dst []*backend, hash uint64, client netip.Addr, n int) []*backend {
	pl := rs.pool.Load()
	t := rs.pins
	if t == nil {
		return pl.pick(dst, hash, n)
	}
	now := pins.Now()
	if key, ok := t.Lookup(hash, now); ok {
		if b := pl.byPin(key); b != nil {
			dst = append(dst, b)
			if n > 1 {
				var more [maxDialAttempts]*backend
				for _, o := range pl.pick(more[:0], hash, n) {
					if o != b && len(dst) < cap(dst) {
						dst = append(dst, o)
					}
				}
			}
			return dst
		}
	}
	start := len(dst)
	dst = pl.pick(dst, hash, n)
	if len(dst) > start {
		switch _, res := t.Pin(hash, dst[start].pinKey, pins.SourceOf(client), now); res {
		case pins.RefusedFull:
			p.pins.refusedFull.Inc()
		case pins.RefusedSource:
			p.pins.refusedSource.Inc()
		}
	}
	return dst
}

// reconcilePins walks a rule's pins after its pool changed (or on the
// sweep): expired pins go, and pins that now differ from the table are
// announced to the peers.
func (p *Proxy) reconcilePins(rs *ruleState, refresh uint32) {
	t := rs.pins
	if t == nil {
		return
	}
	pl := rs.pool.Load()
	p.announce(rs.rule.Name, t.Reconcile(pins.Now(), refresh, pl.primary, pl.takes))
}

// primary is the backend key of the table's first pick for a client, 0 when
// the pool takes no new flows.
func (pl *pool) primary(key uint64) uint64 {
	if len(pl.picks) == 0 {
		return 0
	}
	return pl.backends[pl.picks[pl.table.Lookup(key)]].pinKey
}

// takes reports whether the backend with this pin key takes new flows.
func (pl *pool) takes(backend uint64) bool { return pl.byPin(backend) != nil }

// MergePins takes pins a peer sent for a rule. Where the peer's pin loses
// to this replica's, this replica's goes back to the peers. Safe for
// concurrent use; it does not block on the hot path.
func (p *Proxy) MergePins(rule string, in []pins.Pin) {
	ps := &p.pins
	ps.mu.Lock()
	t := ps.tables[rule]
	rs := ps.served[rule]
	if t == nil {
		if ps.unpinned[rule] {
			ps.mu.Unlock()
			return
		}
		// Not served yet: a replica that is starting learns its peers'
		// pins before its first snapshot.
		t = pins.New(defaultPeerPinTimeout, &ps.lim)
		ps.tables[rule] = t
		ps.pending[rule] = true
	}
	ps.mu.Unlock()
	alive := func(uint64) bool { return true }
	if rs != nil {
		alive = rs.pool.Load().takes
	}

	now := pins.Now()
	var back []pins.Pin
	for _, pin := range in {
		if stored, took := t.Merge(pin, now, alive); !took && stored.Backend != pin.Backend && stored.Backend != 0 {
			back = append(back, stored)
		}
	}
	p.announce(rule, back)
}

// Overrides calls fn with each rule's pins that differ from what its table
// picks: the state a replica that joins must learn. For a rule this replica
// does not serve yet it passes every pin a peer sent.
func (p *Proxy) Overrides(fn func(rule string, ps []pins.Pin)) {
	ps := &p.pins
	ps.mu.Lock()
	type entry struct {
		rule string
		t    *pins.Table
		rs   *ruleState
	}
	all := make([]entry, 0, len(ps.tables))
	for name, t := range ps.tables {
		all = append(all, entry{name, t, ps.served[name]})
	}
	ps.mu.Unlock()
	now := pins.Now()
	for _, e := range all {
		var out []pins.Pin
		if e.rs != nil {
			pl := e.rs.pool.Load()
			out = e.t.Overrides(now, pl.primary, pl.takes)
		} else {
			out = e.t.Overrides(now, nil, nil)
		}
		if len(out) > 0 {
			fn(e.rule, out)
		}
	}
}

// sweepPins runs until Shutdown: it drops expired pins, counts the
// overriding ones, re-announces those whose clients are active, and forgets
// peers' pins for rules that never came.
func (p *Proxy) sweepPins() {
	tick := time.NewTicker(pinSweepInterval)
	defer tick.Stop()
	ps := &p.pins
	ps.lastRefresh = pins.Now()
	for {
		select {
		case <-ps.stop:
			return
		case <-tick.C:
		}
		now := pins.Now()
		var refresh uint32
		if time.Duration(now-ps.lastRefresh)*time.Second >= pinRefreshInterval {
			refresh, ps.lastRefresh = ps.lastRefresh, now
		}
		ps.mu.Lock()
		served := make([]*ruleState, 0, len(ps.served))
		for _, rs := range ps.served {
			served = append(served, rs)
		}
		for name := range ps.pending {
			t := ps.tables[name]
			t.Reconcile(now, 0, func(uint64) uint64 { return 0 }, func(uint64) bool { return false })
			if t.Stats().Held == 0 {
				delete(ps.tables, name)
				delete(ps.pending, name)
			}
		}
		ps.mu.Unlock()
		for _, rs := range served {
			p.reconcilePins(rs, refresh)
		}
	}
}

// pinCollector exports the pin tables' counters at scrape time.
type pinCollector struct {
	p                                 *Proxy
	held, overriding, created, expire *prometheus.Desc
	limit                             *prometheus.Desc
}

func newPinCollector(p *Proxy) *pinCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
	}
	return &pinCollector{
		p:          p,
		held:       d("pins", "Clients pinned to a backend.", "rule"),
		overriding: d("pins_overriding", "Pins whose backend differs from the Maglev table's pick for their client (as of the last sweep or pool change): the ones peers must be told.", "rule"),
		created:    d("pins_created_total", "Pins made: a client's first flow, or a client whose pin had expired.", "rule"),
		expire:     d("pins_expired_total", "Pins dropped because their client had no flow for sessionPersistenceTimeoutInMinutes.", "rule"),
		limit:      d("pins_limit", "The replica's cap on pins (--max-pins)."),
	}
}

func (c *pinCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.held, c.overriding, c.created, c.expire, c.limit} {
		ch <- d
	}
}

func (c *pinCollector) Collect(ch chan<- prometheus.Metric) {
	ps := &c.p.pins
	ps.mu.Lock()
	tables := make(map[string]*pins.Table, len(ps.tables))
	for name, t := range ps.tables {
		tables[name] = t
	}
	ps.mu.Unlock()
	for rule, t := range tables {
		s := t.Stats()
		ch <- prometheus.MustNewConstMetric(c.held, prometheus.GaugeValue, float64(s.Held), rule)
		ch <- prometheus.MustNewConstMetric(c.overriding, prometheus.GaugeValue, float64(s.Overriding), rule)
		ch <- prometheus.MustNewConstMetric(c.created, prometheus.CounterValue, float64(s.Created), rule)
		ch <- prometheus.MustNewConstMetric(c.expire, prometheus.CounterValue, float64(s.Expired), rule)
	}
	ch <- prometheus.MustNewConstMetric(c.limit, prometheus.GaugeValue, float64(ps.lim.MaxPins))
}
