// Package proxy is the dataplane: userspace TCP and UDP listeners that pin
// clients to backends with Maglev tables, as Azure Load Balancer's session
// persistence does.
//
// Configuration arrives as an immutable snapshot.Snapshot through Apply,
// which opens new listeners, closes the ones that are gone and swaps the
// rest in place without dropping a connection. The hot path reads the
// configuration through atomic pointers and never takes a lock to do so.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/health"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// maxDialAttempts is the primary backend plus two retries down the client's
// Maglev preference order.
const maxDialAttempts = 3

// Options bound what the proxy may use. Zero values take the defaults.
type Options struct {
	// DialTimeout bounds a connection attempt to a backend (default 5s).
	DialTimeout time.Duration
	// MaxConnections caps established TCP connections (default 100000).
	MaxConnections int
	// MaxConnectionsPerClient caps TCP connections from one client IP (default 1000).
	MaxConnectionsPerClient int
	// MaxUDPSessions caps UDP sessions per listener (default 65536).
	MaxUDPSessions int
	// MaxUDPSessionsPerClient caps UDP sessions from one client IP (default 256).
	MaxUDPSessionsPerClient int
	// MaxPins caps the clients pinned across all rules (default 1000000).
	// Beyond it new clients are served from the table without a pin; no
	// active pin is ever evicted for a new one.
	MaxPins int
	// MaxPinsPerSource caps, per rule, the pins of one client network: an
	// IPv4 /24 or an IPv6 /64 (default 1024).
	MaxPinsPerSource int
	// Registerer receives the proxy's metrics (default: a private registry).
	Registerer prometheus.Registerer
	// OnHealthChange, if set, is called with a rule's name after a probe
	// transition changed the backends it sends new flows to. It runs on a
	// probe goroutine and must not block.
	OnHealthChange func(rule string)
	Log            logr.Logger
	// BackendCongestionControl is the TCP congestion control of connections
	// to backends: a comma-separated preference list of algorithms, of which
	// the first the kernel lets this process set is used; "system" is the
	// system's default. Default "cubic,reno" (see congestion.go).
	BackendCongestionControl string
	// FrontendCongestionControl is the same for client connections.
	// Default "system".
	FrontendCongestionControl string
	// NearClientRTT: clients whose smallest round-trip time is under it
	// are as near as the backends and run BackendCongestionControl instead
	// (see congestion.go). 0 takes the default, 1ms; negative turns it off.
	NearClientRTT time.Duration

	// loops is the number of TCP event loops (default GOMAXPROCS).
	loops int
	// offloadAfter is what one pump of a bulk direction moves on its loop
	// before a copier takes the direction over (default pumpBudget).
	offloadAfter int
}

func (o *Options) defaults() {
	if o.offloadAfter <= 0 {
		o.offloadAfter = pumpBudget
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 100000
	}
	if o.MaxConnectionsPerClient <= 0 {
		o.MaxConnectionsPerClient = 1000
	}
	if o.MaxUDPSessions <= 0 {
		o.MaxUDPSessions = 65536
	}
	if o.MaxUDPSessionsPerClient <= 0 {
		o.MaxUDPSessionsPerClient = 256
	}
	if o.MaxPins <= 0 {
		o.MaxPins = 1_000_000
	}
	if o.MaxPinsPerSource <= 0 {
		o.MaxPinsPerSource = 1024
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	if strings.TrimSpace(o.BackendCongestionControl) == "" {
		o.BackendCongestionControl = defaultBackendCongestion
	}
	if strings.TrimSpace(o.FrontendCongestionControl) == "" {
		o.FrontendCongestionControl = defaultFrontendCongestion
	}
	if o.NearClientRTT == 0 {
		o.NearClientRTT = defaultNearClientRTT
	}
}

// listener is one listening socket serving one rule.
type listener interface {
	serve(rs *ruleState)
	close()
}

// Proxy serves the current snapshot.
type Proxy struct {
	opts    Options
	log     logr.Logger
	metrics *metrics
	monitor *health.Monitor
	// backendCC and clientCC are the congestion control of connections to
	// backends and of client connections.
	backendCC congestion
	clientCC  clientCongestion

	mu        sync.Mutex // serialises Apply and Shutdown; never taken on the hot path
	current   *snapshot.Snapshot
	rules     map[string]*ruleState
	listeners map[snapshot.ListenerKey]listener
	// want holds the listeners the rules served need, unbound those of them
	// not open (Apply tries them again).
	want, unbound map[snapshot.ListenerKey]*ruleState
	// byTarget maps a health target to the rules probing it, for probe notifications.
	byTarget atomic.Pointer[map[health.Target][]*ruleState]

	// loops run the TCP listeners and flows; started with the first TCP
	// listener, stopped by Shutdown.
	loops []*loop

	pins pinState

	shutdown atomic.Bool
	// tcpConns counts TCP flows, from accept to close.
	tcpConns atomic.Int64
	clients  clientCounter
}

// New returns a proxy serving nothing until the first Apply.
func New(opts Options) (*Proxy, error) {
	opts.defaults()
	backendCC, err := pickCongestion("--backend-congestion-control", opts.BackendCongestionControl)
	if err != nil {
		return nil, err
	}
	frontendCC, err := pickCongestion("--frontend-congestion-control", opts.FrontendCongestionControl)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(opts.Registerer)
	if err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	clientCC := newClientCongestion(backendCC, frontendCC, opts.NearClientRTT)
	m.congestion.WithLabelValues("backend", backendCC.effective).Set(1)
	m.congestion.WithLabelValues("frontend", frontendCC.effective).Set(1)
	near := "none"
	if clientCC.far != nil {
		near = fmt.Sprintf("under %v: %s", opts.NearClientRTT, clientCC.listen.effective)
		m.congestion.WithLabelValues("frontend_near", clientCC.listen.effective).Set(1)
	}
	opts.Log.Info("TCP congestion control", "backend", backendCC.effective, "frontend", frontendCC.effective, "nearClients", near)
	p := &Proxy{
		backendCC: backendCC,
		clientCC:  clientCC,
		opts:      opts,
		log:       opts.Log,
		metrics:   m,
		rules:     map[string]*ruleState{},
		listeners: map[snapshot.ListenerKey]listener{},
	}
	p.clients.init()
	p.pins.init(&p.opts, m)
	if err := opts.Registerer.Register(newPinCollector(p)); err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	go p.sweepPins()
	empty := map[health.Target][]*ruleState{}
	p.byTarget.Store(&empty)
	p.monitor = health.New(p.onProbeTransition)
	return p, nil
}

// onProbeTransition rebuilds the pools of the rules probing the target. It
// runs on a probe goroutine, so it touches no Apply state.
func (p *Proxy) onProbeTransition(t health.Transition) {
	p.log.Info("backend health changed", "backend", t.Target.String(), "up", t.Up, "reason", t.Reason)
	for _, rs := range (*p.byTarget.Load())[t.Target] {
		rs.rebuild(p.monitor.Status, p.metrics)
		p.reconcilePins(rs, 0)
		if p.opts.OnHealthChange != nil {
			p.opts.OnHealthChange(rs.rule.Name)
		}
	}
}

// Healthy reports how many of the rule's backends take new flows: in the
// pool, not draining, and passing the rule's probe. ok is false for a rule
// the proxy does not serve.
func (p *Proxy) Healthy(rule string) (healthy int, ok bool) {
	p.mu.Lock()
	rs, ok := p.rules[rule]
	p.mu.Unlock()
	if !ok {
		return 0, false
	}
	return rs.pool.Load().healthy, true
}

// ProbedDown is how many of a served rule's non-draining backends fail their
// probe, counted in the same pool as Healthy.
func (p *Proxy) ProbedDown(rule string) (down int, ok bool) {
	p.mu.Lock()
	rs, ok := p.rules[rule]
	p.mu.Unlock()
	if !ok {
		return 0, false
	}
	pl := rs.pool.Load()
	return pl.active - pl.healthy, true
}

// Version is the version of the snapshot being served (0 before the first Apply).
func (p *Proxy) Version() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.current == nil {
		return 0
	}
	return p.current.Version
}

// ErrShutdown is returned by Apply after Shutdown.
var ErrShutdown = errors.New("proxy is shut down")

// Apply serves s from now on. Listeners new in s are opened, those gone are
// closed (their established TCP flows drain), and the others switch to their
// new rule in place. It returns the rules whose listeners could not be
// opened; the rest of s is served regardless. Apply retries such listeners
// on the next call.
//
// Its cost is one cheap look at each rule (snapshot.Rule.Equal, which does
// not walk backends that s shares with the snapshot served) plus the work
// for the rules that changed: rules that did not change keep their state,
// pool and listeners untouched.
func (p *Proxy) Apply(s *snapshot.Snapshot) (failed map[string]error, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, err := p.diff(s)
	if err != nil {
		return nil, err
	}
	if p.shutdown.Load() {
		return nil, ErrShutdown
	}
	if p.want == nil {
		p.want = map[snapshot.ListenerKey]*ruleState{}
		p.unbound = map[snapshot.ListenerKey]*ruleState{}
	}

	probes := false
	fresh := make([]*ruleState, 0, len(d.changed))
	for _, c := range d.changed {
		if c.old != nil {
			p.forgetRemovedBackends(c.old.rule, c.rule)
			probes = probes || c.old.rule.Probe != nil
		}
		// A copy: pointing into s.Rules would keep every rule of s alive
		// for as long as this one rule is served.
		rc := *c.rule
		fresh = append(fresh, newRuleState(&rc, p.metrics))
		probes = probes || rc.Probe != nil
	}
	for _, rs := range d.removed {
		p.metrics.forgetRule(rs.rule)
		probes = probes || rs.rule.Probe != nil
	}
	// From here on p.rules is what s serves; attachPins still sees the
	// rules replaced, through the states it is given.
	replaced := make([]*ruleState, len(fresh))
	for i, c := range d.changed {
		replaced[i] = c.old
	}
	gone := make([]string, 0, len(d.removed))
	for _, rs := range d.removed {
		gone = append(gone, rs.rule.Name)
	}
	p.attachPins(fresh, replaced, gone)
	for _, rs := range d.removed {
		delete(p.rules, rs.rule.Name)
	}
	for _, rs := range fresh {
		p.rules[rs.rule.Name] = rs
	}
	if probes {
		// Probers start (Up) before the pools are built so that every pool
		// sees a known status; unchanged targets keep theirs.
		byTarget := map[health.Target][]*ruleState{}
		var targets []health.Target
		for _, rs := range p.rules {
			if rs.rule.Probe == nil {
				continue
			}
			for _, b := range rs.rule.Backends {
				if t, ok := probeTarget(rs.rule, b.Addr); ok {
					if byTarget[t] == nil {
						targets = append(targets, t)
					}
					byTarget[t] = append(byTarget[t], rs)
				}
			}
		}
		if err := p.monitor.Update(targets); err != nil {
			p.log.Error(err, "some health probes could not start")
		}
		p.byTarget.Store(&byTarget)
	}
	for _, rs := range fresh {
		rs.rebuild(p.monitor.Status, p.metrics)
		// Before the rule serves its new pool: pins that now differ from
		// the table go to the peers.
		p.reconcilePins(rs, 0)
	}
	p.publishPins(fresh, gone) // every pool is built: peers may use them

	// Listeners: those of the rules gone or replaced are released, those of
	// the new states claimed; a listener kept switches to its new state.
	var released []snapshot.ListenerKey
	for _, rs := range d.removed {
		released = p.release(released, rs)
	}
	for _, c := range d.changed {
		if c.old != nil {
			released = p.release(released, c.old)
		}
	}
	for _, rs := range fresh {
		for _, k := range rs.rule.Listeners() {
			p.want[k] = rs
			p.unbound[k] = rs
		}
	}
	for _, k := range released {
		if l, ok := p.listeners[k]; ok {
			if _, wanted := p.want[k]; !wanted {
				l.close()
				delete(p.listeners, k)
			}
		}
	}
	failed = map[string]error{}
	for k, rs := range p.unbound {
		if l, ok := p.listeners[k]; ok {
			l.serve(rs)
			delete(p.unbound, k)
			continue
		}
		l, err := p.listen(k)
		if err != nil {
			failed[rs.rule.Name] = err
			p.log.Error(err, "cannot listen", "rule", rs.rule.Name, "listener", k.String())
			continue
		}
		p.listeners[k] = l
		l.serve(rs)
		delete(p.unbound, k)
	}
	p.current = s
	p.metrics.version.Set(float64(s.Version))
	return failed, nil
}

// ruleChange is a rule of a snapshot that Apply must build a state for:
// new, or different from the one served (old).
type ruleChange struct {
	rule *snapshot.Rule
	old  *ruleState
}

// applyDiff is what a snapshot changes in what the proxy serves.
type applyDiff struct {
	changed []ruleChange
	removed []*ruleState
}

// diff compares s with the rules served, and validates it as
// snapshot.Validate does: the rules that did not change were valid when
// they were applied, so only the changed ones are checked, against the
// listeners the others keep. It changes nothing.
func (p *Proxy) diff(s *snapshot.Snapshot) (applyDiff, error) {
	var d applyDiff
	sorted := true
	matched := 0
	for i := range s.Rules {
		r := &s.Rules[i]
		if i > 0 && s.Rules[i-1].Name >= r.Name {
			sorted = false
		}
		rs, ok := p.rules[r.Name]
		if ok {
			matched++
			if rs.rule.Equal(r) {
				continue
			}
		}
		if r.Port == 0 || len(r.Protocols) == 0 || !r.Bind.IsValid() {
			return applyDiff{}, fmt.Errorf("rule %s: needs a bind address, a port and a protocol", r.Name)
		}
		d.changed = append(d.changed, ruleChange{rule: r, old: rs})
	}
	var names map[string]struct{}
	if !sorted {
		// Rules out of order (the snapshot package sorts them): find
		// duplicates and removals with a set.
		names = make(map[string]struct{}, len(s.Rules))
		for i := range s.Rules {
			if _, dup := names[s.Rules[i].Name]; dup {
				return applyDiff{}, fmt.Errorf("rule %s is in the snapshot twice", s.Rules[i].Name)
			}
			names[s.Rules[i].Name] = struct{}{}
		}
	}
	if matched < len(p.rules) {
		for name, rs := range p.rules {
			var in bool
			if sorted {
				_, in = s.Rule(name)
			} else {
				_, in = names[name]
			}
			if !in {
				d.removed = append(d.removed, rs)
			}
		}
	}

	// Listener claims: a changed rule may take a listener no rule that
	// stays holds, and no other changed rule.
	released := make(map[*ruleState]bool, len(d.changed)+len(d.removed))
	for _, rs := range d.removed {
		released[rs] = true
	}
	for _, c := range d.changed {
		if c.old != nil {
			released[c.old] = true
		}
	}
	claimed := make(map[snapshot.ListenerKey]string, len(d.changed))
	for _, c := range d.changed {
		for _, k := range c.rule.Listeners() {
			if owner, ok := p.want[k]; ok && !released[owner] {
				return applyDiff{}, fmt.Errorf("rules %s and %s both listen on %s", owner.rule.Name, c.rule.Name, k)
			}
			if owner, ok := claimed[k]; ok {
				return applyDiff{}, fmt.Errorf("rules %s and %s both listen on %s", owner, c.rule.Name, k)
			}
			claimed[k] = c.rule.Name
		}
	}
	return d, nil
}

// release gives up the listeners rs wanted, appending them to keys; the
// ones a new state claims again stay open (Apply closes the others).
func (p *Proxy) release(keys []snapshot.ListenerKey, rs *ruleState) []snapshot.ListenerKey {
	for _, k := range rs.rule.Listeners() {
		if p.want[k] == rs {
			delete(p.want, k)
			keys = append(keys, k)
		}
		if p.unbound[k] == rs {
			delete(p.unbound, k)
		}
	}
	return keys
}

func (p *Proxy) forgetRemovedBackends(old, cur *snapshot.Rule) {
	keep := make(map[netip.AddrPort]bool, len(cur.Backends))
	for _, b := range cur.Backends {
		keep[b.Addr] = true
	}
	for _, b := range old.Backends {
		if !keep[b.Addr] {
			p.metrics.forgetBackend(old.Name, b.Addr.String())
		}
	}
}

func (p *Proxy) listen(k snapshot.ListenerKey) (listener, error) {
	switch k.Protocol {
	case snapshot.TCP:
		return p.listenTCP(k)
	case snapshot.UDP:
		return p.listenUDP(k)
	}
	return nil, fmt.Errorf("listener %s: unsupported protocol", k)
}

// Shutdown stops accepting, lets established TCP flows finish until ctx is
// done, then closes what is left. UDP listeners and sessions close at once:
// UDP has no end of flow to wait for.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.shutdown.Swap(true) {
		close(p.pins.stop)
	}
	for k, l := range p.listeners {
		l.close()
		delete(p.listeners, k)
	}
	p.mu.Unlock()
	p.monitor.Close()
	err := p.drain(ctx)
	if err != nil {
		p.log.Info("drain timeout: closing remaining connections", "flows", p.tcpConns.Load())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.loops {
		l.do(func() { l.flows.each(func(f *tcpFlow) { f.close(l) }) })
		l.stop()
	}
	// A flow a copier holds closes when the copier is back, promptly: it
	// has been told to stop, and none of its system calls blocks.
	for _, l := range p.loops {
		<-l.done
	}
	p.loops = nil
	return err
}

// drain waits until no TCP flow is left, or ctx is done.
func (p *Proxy) drain(ctx context.Context) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for p.tcpConns.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}
