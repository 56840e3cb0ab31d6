// Package peers shares pins between the dataplane replicas, so that a client
// pinned through one replica gets the same backend through any other.
//
// Replicas form a cluster with hashicorp/memberlist (as MetalLB's speakers
// do). Only the pins that differ from the Maglev table travel, since every
// replica computes the same table:
//   - an announcement (Announce) rides on memberlist's gossip: UDP packets
//     sent every gossip interval to a few random members, each message
//     retransmitted a few times;
//   - memberlist's push/pull, a full state exchange over TCP with one random
//     member every PushPullInterval, carries every override a replica holds.
//     It teaches a joining replica the existing pins before it reports
//     itself synced, and repairs announcements gossip lost or this package
//     dropped.
//
// Every packet and stream is encrypted and authenticated with the shared key
// (AES-256-GCM): only holders of the key can join, add or change pins.
// Without a key the replica does not peer at all.
//
// The pin table knows nothing of this package: the proxy hands it the pins
// to announce (Announce) and takes what peers send through a Store.
package peers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/pins"
)

// Store is the local pin table as peers see it (the proxy).
type Store interface {
	// MergePins takes pins a peer sent for a rule. It must not block.
	MergePins(rule string, ps []pins.Pin)
	// Overrides calls fn for every rule with its pins that override the
	// Maglev table: what a joining peer must learn.
	Overrides(fn func(rule string, ps []pins.Pin))
}

// Defaults.
const (
	DefaultPort           = 7946
	DefaultJoinTimeout    = 10 * time.Second
	DefaultRejoinInterval = 15 * time.Second
)

const (
	// maxQueued caps the announcements waiting for gossip, in messages of
	// about 45 pins. Beyond it the oldest are dropped: push/pull carries
	// them anyway.
	maxQueued = 256
	// syncBacklog: an announcement of more messages than this asks for a
	// push/pull with every member right away. A gossip round sends each
	// member one packet, about one message: a larger burst takes several
	// rounds, in which every transmission of a message goes to a random
	// member, so some member may miss it.
	syncBacklog = 4
	// minSyncGap spaces those early exchanges.
	minSyncGap = 5 * time.Second
	// retransmitMult: each member sends each message it queued
	// retransmitMult × ceil(log10(members+1)) times, each time to a random
	// member. memberlist's default, 4, lets one of two peers miss a message
	// one time in 16 before the peer's own retransmissions; announcements
	// are rare (pool changes), so they can afford twice as many.
	retransmitMult = 8
	// joinRetry is the pause between two attempts of the initial join.
	joinRetry = 500 * time.Millisecond
	// leaveTimeout bounds the goodbye on shutdown.
	leaveTimeout = 2 * time.Second
	// udpBuffer is memberlist's packet size (its LAN default); messages are
	// sized below it until GetBroadcasts tells the exact room.
	udpBuffer      = 1400
	initialMsgSize = udpBuffer - 100
)

// Config configures a replica's peering.
type Config struct {
	// Name is this replica's name among its peers, unique (the pod's name).
	Name string
	// Bind is where the replica listens for peers, TCP and UDP.
	Bind netip.AddrPort
	// Advertise is the address peers reach the replica at (default: Bind,
	// or a private address of this host when Bind is unspecified).
	Advertise netip.AddrPort
	// Key is the shared key, KeySize bytes. Empty: no peering.
	Key []byte
	// Peers lists the addresses ("host:port") of the replicas to join. It
	// may include this replica, which is skipped. It is called at start and
	// every RejoinInterval.
	Peers func(context.Context) ([]string, error)
	// JoinTimeout bounds the initial join (default DefaultJoinTimeout).
	JoinTimeout time.Duration
	// RejoinInterval is how often the replica looks for peers it is not
	// connected to (default DefaultRejoinInterval).
	RejoinInterval time.Duration
	// Registerer receives the metrics (default: a private registry).
	Registerer prometheus.Registerer
	Log        logr.Logger
}

// Peers is one replica's membership in the cluster of replicas. It
// implements the proxy's PinSync (Announce) and controller-runtime's
// manager.Runnable.
type Peers struct {
	cfg     Config
	store   Store
	log     logr.Logger
	metrics *metrics
	enabled bool

	started atomic.Bool
	synced  atomic.Bool
	quiet   atomic.Bool // memberlist's log is muted once it is shut down
	crash   bool        // tests: stop without saying goodbye

	// mu serialises the queue's writers (Announce) with its reader
	// (GetBroadcasts), so that what Prune drops can be counted.
	mu      sync.Mutex
	queue   *memberlist.TransmitLimitedQueue
	msgSize atomic.Int64 // the room of one message, learned from GetBroadcasts

	membersMu sync.Mutex
	members   map[string]string // other live members: name -> address
	others    atomic.Int64

	recent recentIDs
	// syncNow asks the run loop for an early push/pull with every member.
	syncNow chan struct{}
}

// New returns the peering of a replica whose pins are in store. With no
// key it returns a Peers that does nothing, is synced at once, and says so
// in the log and in stickylb_peer_sync_enabled.
func New(cfg Config, store Store) (*Peers, error) {
	if cfg.JoinTimeout <= 0 {
		cfg.JoinTimeout = DefaultJoinTimeout
	}
	if cfg.RejoinInterval <= 0 {
		cfg.RejoinInterval = DefaultRejoinInterval
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	p := &Peers{cfg: cfg, store: store, log: cfg.Log, metrics: m, members: map[string]string{}, syncNow: make(chan struct{}, 1)}
	p.msgSize.Store(initialMsgSize)
	p.queue = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(p.others.Load()) + 1 },
		RetransmitMult: retransmitMult,
	}
	if len(cfg.Key) == 0 {
		p.synced.Store(true)
		p.log.Info("no peer key: this replica does not share pins with its peers; it serves from the Maglev table and its own pins")
		return p, nil
	}
	if len(cfg.Key) != KeySize {
		return nil, fmt.Errorf("peer key: %d bytes, want %d", len(cfg.Key), KeySize)
	}
	if cfg.Name == "" {
		return nil, errors.New("peers: a replica needs a name")
	}
	if !cfg.Bind.IsValid() {
		return nil, errors.New("peers: no bind address")
	}
	if store == nil {
		return nil, errors.New("peers: no pin store")
	}
	p.enabled = true
	m.enabled.Set(1)
	return p, nil
}

// Enabled reports whether the replica peers (it has a key).
func (p *Peers) Enabled() bool { return p.enabled }

// Synced reports whether the initial join is over: the replica joined its
// peers and merged their pins, or found nobody to join, or gave up after
// JoinTimeout. Without a key it is always true.
func (p *Peers) Synced() bool { return p.synced.Load() }

// NeedLeaderElection: every replica peers.
func (p *Peers) NeedLeaderElection() bool { return false }

// Start joins the peers and stays in the cluster until ctx ends; then it
// leaves. It returns an error only when it cannot listen.
func (p *Peers) Start(ctx context.Context) error {
	if !p.enabled {
		<-ctx.Done()
		return nil
	}
	if !p.started.CompareAndSwap(false, true) {
		return errors.New("peers: started twice")
	}
	ml, err := memberlist.Create(p.memberlistConfig())
	if err != nil {
		return fmt.Errorf("peers: listen on %s: %w", p.cfg.Bind, err)
	}
	local := ml.LocalNode()
	p.log.Info("peering", "name", local.Name, "address", local.Address())
	defer func() {
		if !p.crash {
			if err := ml.Leave(leaveTimeout); err != nil {
				p.log.Info("leaving the peers", "error", err.Error())
			}
		}
		_ = ml.Shutdown()
		// Its goroutines may still complain of closed sockets.
		p.quiet.Store(true)
	}()

	p.initialJoin(ctx, ml)
	p.synced.Store(true)

	tick := time.NewTicker(p.cfg.RejoinInterval)
	defer tick.Stop()
	var lastSync time.Time
	var syncLater <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			p.rejoin(ctx, ml)
		case <-p.syncNow:
			if syncLater != nil {
				continue
			}
			if wait := minSyncGap - time.Since(lastSync); wait > 0 {
				syncLater = time.After(wait)
				continue
			}
			p.exchange(ml)
			lastSync = time.Now()
		case <-syncLater:
			syncLater = nil
			p.exchange(ml)
			lastSync = time.Now()
		}
	}
}

func (p *Peers) memberlistConfig() *memberlist.Config {
	c := memberlist.DefaultLANConfig()
	c.Name = p.cfg.Name
	c.BindAddr = p.cfg.Bind.Addr().String()
	c.BindPort = int(p.cfg.Bind.Port())
	c.AdvertisePort = c.BindPort
	if a := p.cfg.Advertise; a.IsValid() {
		c.AdvertiseAddr = a.Addr().String()
		c.AdvertisePort = int(a.Port())
	}
	c.SecretKey = p.cfg.Key
	c.GossipVerifyIncoming = true
	c.GossipVerifyOutgoing = true
	c.Delegate = delegate{p}
	c.Events = events{p}
	c.Logger = log.New(logWriter{p.log.WithName("memberlist"), &p.quiet}, "", 0)
	c.UDPBufferSize = udpBuffer
	// A gossip round with nothing queued costs nothing; a short interval
	// carries a burst of announcements in fewer seconds.
	c.GossipInterval = 50 * time.Millisecond
	c.PushPullInterval = 15 * time.Second
	// A push/pull (up to MaxStateBytes) must finish within TCPTimeout; a
	// peer that does not answer must not hold the initial join long.
	c.TCPTimeout = 5 * time.Second
	// A replica that comes back with its name at a new address may take
	// the name over once its old self is known dead.
	c.DeadNodeReclaimTime = 10 * time.Second
	return c
}

// initialJoin joins the peers Config.Peers lists, retrying until one of them
// answered or JoinTimeout passed.
func (p *Peers) initialJoin(ctx context.Context, ml *memberlist.Memberlist) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, p.cfg.JoinTimeout)
	defer cancel()
	var lastErr error
	for attempt := 1; ; attempt++ {
		addrs, err := p.discover(ctx, ml)
		switch {
		case err != nil:
			lastErr = err
		case len(addrs) == 0:
			p.log.Info("no peers to join: serving from the Maglev table and this replica's pins", "took", time.Since(start).Round(time.Millisecond).String())
			return
		default:
			if err := p.join(ml, addrs); err != nil {
				lastErr = err
			}
			if p.others.Load() > 0 {
				p.log.Info("joined the peers: their pins are merged", "peers", p.others.Load(), "attempts", attempt,
					"took", time.Since(start).Round(time.Millisecond).String())
				return
			}
		}
		t := time.NewTimer(joinRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			p.log.Info("no peer answered within the join timeout: serving from the Maglev table and this replica's pins; still trying",
				"timeout", p.cfg.JoinTimeout.String(), "attempts", attempt, "lastError", fmt.Sprint(lastErr), "retryEvery", p.cfg.RejoinInterval.String())
			return
		case <-t.C:
		}
	}
}

// rejoin joins the listed peers that are not members: replicas that started
// after this one did not list, or that were cut off and are back.
func (p *Peers) rejoin(ctx context.Context, ml *memberlist.Memberlist) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.JoinTimeout)
	defer cancel()
	addrs, err := p.discover(ctx, ml)
	if err != nil {
		p.log.V(1).Info("listing peers", "error", err.Error())
		return
	}
	live := map[netip.AddrPort]bool{}
	for _, n := range ml.Members() {
		if a, ok := nodeAddr(n); ok {
			live[a] = true
		}
	}
	var missing []netip.AddrPort
	for _, a := range addrs {
		if !live[a] {
			missing = append(missing, a)
		}
	}
	if len(missing) == 0 {
		return
	}
	err = p.join(ml, missing)
	p.log.V(1).Info("joined peers that were not members", "addresses", fmt.Sprint(missing), "error", fmt.Sprint(err), "peers", p.others.Load())
}

// exchange runs a push/pull with every member now, through memberlist's
// join (a full state exchange with each address given).
func (p *Peers) exchange(ml *memberlist.Memberlist) {
	var addrs []netip.AddrPort
	for _, n := range ml.Members() {
		if a, ok := nodeAddr(n); ok && n.Name != p.cfg.Name {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) > 0 {
		err := p.join(ml, addrs)
		p.log.V(1).Info("early state exchange after a burst of announcements", "peers", len(addrs), "error", fmt.Sprint(err))
	}
}

// join runs memberlist's join with each address at once; it returns an
// error when none answered.
func (p *Peers) join(ml *memberlist.Memberlist, addrs []netip.AddrPort) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	ok := 0
	for _, a := range addrs {
		wg.Go(func() {
			_, err := ml.Join([]string{a.String()})
			err = single(err)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			ok++
		})
	}
	wg.Wait()
	if ok == 0 {
		return errors.Join(errs...)
	}
	return nil
}

// single unwraps a multierror (memberlist's) of one error, whose text
// would span lines.
func single(err error) error {
	if m, ok := err.(interface{ WrappedErrors() []error }); ok && len(m.WrappedErrors()) == 1 {
		return m.WrappedErrors()[0]
	}
	return err
}

// discover lists the peers' addresses, resolved, without this replica's.
func (p *Peers) discover(ctx context.Context, ml *memberlist.Memberlist) ([]netip.AddrPort, error) {
	if p.cfg.Peers == nil {
		return nil, nil
	}
	list, err := p.cfg.Peers(ctx)
	if err != nil {
		return nil, fmt.Errorf("list peers: %w", err)
	}
	self, _ := nodeAddr(ml.LocalNode())
	seen := map[netip.AddrPort]bool{}
	var out []netip.AddrPort
	var errs []error
	for _, s := range list {
		addrs, err := resolve(ctx, s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, a := range addrs {
			if seen[a] || a == self || p.isSelf(a) {
				continue
			}
			seen[a] = true
			out = append(out, a)
		}
	}
	if len(out) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// isSelf reports whether a is this replica's peer address.
func (p *Peers) isSelf(a netip.AddrPort) bool {
	b := p.cfg.Bind
	if a == b || (p.cfg.Advertise.IsValid() && a == p.cfg.Advertise) {
		return true
	}
	if a.Port() != b.Port() || !b.Addr().IsUnspecified() {
		return false
	}
	if a.Addr().IsLoopback() {
		return true
	}
	ifaddrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, ia := range ifaddrs {
		if n, ok := ia.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == a.Addr() {
				return true
			}
		}
	}
	return false
}

// resolve turns "host:port" into addresses.
func resolve(ctx context.Context, hostport string) ([]netip.AddrPort, error) {
	hostport = strings.TrimSpace(hostport)
	if a, err := netip.ParseAddrPort(hostport); err == nil {
		return []netip.AddrPort{netip.AddrPortFrom(a.Addr().Unmap(), a.Port())}, nil
	}
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", hostport, err)
	}
	port, err := net.DefaultResolver.LookupPort(ctx, "tcp", portStr)
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", hostport, err)
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("peer %q: %w", hostport, err)
	}
	out := make([]netip.AddrPort, 0, len(ips))
	for _, ip := range ips {
		out = append(out, netip.AddrPortFrom(ip.Unmap(), uint16(port)))
	}
	return out, nil
}

func nodeAddr(n *memberlist.Node) (netip.AddrPort, bool) {
	if n == nil {
		return netip.AddrPort{}, false
	}
	ip, ok := netip.AddrFromSlice(n.Addr)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip.Unmap(), n.Port), true
}

// Announce hands pins to the peers: it implements the proxy's PinSync. It
// never blocks on the network: the pins are queued, in messages that fit
// a gossip packet, and gossip sends them. Beyond maxQueued messages the
// oldest are dropped (counted); a burst of more than syncBacklog messages
// also asks for a push/pull with every member at once, which carries all
// of them.
func (p *Peers) Announce(rule string, ps []pins.Pin) {
	if !p.enabled || len(ps) == 0 || p.others.Load() == 0 {
		// Nobody to tell now; whoever joins later pulls the state.
		return
	}
	if len(rule) == 0 || len(rule) > maxRuleLen {
		p.metrics.dropped.WithLabelValues(dropRuleName).Inc()
		return
	}
	per := max(1, (int(p.msgSize.Load())-headerLen-batchOverhead(rule))/pinSize)
	msgs := (len(ps) + per - 1) / per
	skipped := 0
	if msgs > maxQueued {
		// Only the newest maxQueued messages could stay: skip encoding the rest.
		skipped = msgs - maxQueued
		ps = ps[skipped*per:]
	}
	now := time.Now()
	batch := make([]broadcast, 0, min(msgs, maxQueued))
	for len(ps) > 0 {
		chunk := ps[:min(per, len(ps))]
		ps = ps[len(chunk):]
		id := newID()
		p.recent.add(id) // not to take it back from a peer passing it on
		b := appendHeader(make([]byte, 0, headerLen+batchOverhead(rule)+len(chunk)*pinSize), id, now)
		batch = append(batch, appendBatch(b, rule, chunk))
		p.metrics.sent.WithLabelValues(viaGossip).Add(float64(len(chunk)))
	}
	if skipped > 0 {
		p.metrics.dropped.WithLabelValues(dropQueueFull).Add(float64(skipped))
	}
	if p.enqueue(batch...); msgs > syncBacklog {
		select {
		case p.syncNow <- struct{}{}:
		default:
		}
	}
}

// enqueue queues messages for gossip and drops the oldest beyond maxQueued.
func (p *Peers) enqueue(bs ...broadcast) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, b := range bs {
		p.queue.QueueBroadcast(b)
	}
	n := p.queue.NumQueued()
	if n > maxQueued {
		p.queue.Prune(maxQueued)
		p.metrics.dropped.WithLabelValues(dropQueueFull).Add(float64(n - maxQueued))
	}
}

// newID is a message id: random, never 0 (the id of a push/pull state).
func newID() uint64 {
	for {
		if id := rand.Uint64(); id != 0 {
			return id
		}
	}
}

// broadcast is one queued announcement.
type broadcast []byte

func (b broadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b broadcast) Message() []byte                       { return b }
func (b broadcast) Finished()                             {}
func (b broadcast) UniqueBroadcast()                      {}

// delegate is memberlist's view of Peers.
type delegate struct{ p *Peers }

func (d delegate) NodeMeta(int) []byte { return nil }

// GetBroadcasts hands gossip the queued announcements that fit.
func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	p := d.p
	if room := int64(min(limit-overhead, maxPacketBytes)); room > p.msgSize.Load() {
		p.msgSize.Store(room)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.queue.GetBroadcasts(overhead, limit)
}

// NotifyMsg takes an announcement. b is only valid during the call;
// Decode copies what it keeps.
func (d delegate) NotifyMsg(b []byte) {
	p := d.p
	if len(b) > maxPacketBytes {
		p.metrics.dropped.WithLabelValues(dropUndecodable).Inc()
		return
	}
	m, ok := p.decode(b, viaGossip)
	if !ok || !p.recent.add(m.ID) {
		return
	}
	p.metrics.lag.Observe(max(0, time.Since(m.Sent).Seconds()))
	p.merge(m, viaGossip)
	// Pass it on, as each member does with memberlist's own news: each
	// queued message goes to a few random members only, so without this a
	// member can miss it until the next push/pull.
	p.enqueue(broadcast(bytes.Clone(b)))
}

// LocalState is this replica's overrides, for a push/pull, at most
// MaxStateBytes.
func (d delegate) LocalState(bool) []byte {
	p := d.p
	b := appendHeader(make([]byte, 0, 4096), 0, time.Now())
	sent, truncated := 0, false
	p.store.Overrides(func(rule string, ps []pins.Pin) {
		if truncated || len(ps) == 0 || len(rule) == 0 || len(rule) > maxRuleLen {
			return
		}
		room := (MaxStateBytes - len(b) - batchOverhead(rule)) / pinSize
		if room < len(ps) {
			truncated = true
			ps = ps[:max(room, 0)]
			if len(ps) == 0 {
				return
			}
		}
		b = appendBatch(b, rule, ps)
		sent += len(ps)
	})
	p.metrics.sent.WithLabelValues(viaState).Add(float64(sent))
	if truncated {
		p.metrics.dropped.WithLabelValues(dropStateTruncated).Inc()
		p.log.V(1).Info("state for a peer truncated", "maxBytes", MaxStateBytes, "pins", sent)
	}
	return b
}

// MergeRemoteState takes a peer's overrides. memberlist bounds buf (20 MiB).
func (d delegate) MergeRemoteState(buf []byte, _ bool) {
	p := d.p
	if m, ok := p.decode(buf, viaState); ok {
		p.merge(m, viaState)
	}
}

func (p *Peers) decode(b []byte, via string) (Message, bool) {
	m, err := Decode(b)
	if err == nil {
		return m, true
	}
	reason := dropUndecodable
	if errors.Is(err, ErrVersion) {
		reason = dropVersion
	}
	p.metrics.dropped.WithLabelValues(reason).Inc()
	p.log.V(1).Info("dropped a peer message", "via", via, "reason", reason, "error", err.Error())
	return Message{}, false
}

func (p *Peers) merge(m Message, via string) {
	n := 0
	for _, bt := range m.Batches {
		p.store.MergePins(bt.Rule, bt.Pins)
		n += len(bt.Pins)
	}
	p.metrics.received.WithLabelValues(via).Add(float64(n))
}

// events keeps the count of other live members.
type events struct{ p *Peers }

func (e events) NotifyJoin(n *memberlist.Node) {
	if n.Name == e.p.cfg.Name {
		return
	}
	e.p.setMember(n.Name, n.Address())
	e.p.log.Info("peer joined", "peer", n.Name, "address", n.Address())
}

func (e events) NotifyLeave(n *memberlist.Node) {
	if n.Name == e.p.cfg.Name {
		return
	}
	e.p.setMember(n.Name, "")
	e.p.log.Info("peer left", "peer", n.Name, "address", n.Address())
}

func (e events) NotifyUpdate(*memberlist.Node) {}

func (p *Peers) setMember(name, addr string) {
	p.membersMu.Lock()
	defer p.membersMu.Unlock()
	if addr == "" {
		delete(p.members, name)
	} else {
		p.members[name] = addr
	}
	p.others.Store(int64(len(p.members)))
	p.metrics.peers.Set(float64(len(p.members)))
}

// recentIDs remembers the last announcements received, to count and merge
// each once although gossip delivers it several times.
type recentIDs struct {
	mu   sync.Mutex
	ring [16384]uint64 // well above what all members queue together
	next int
	set  map[uint64]struct{}
}

// add records id and reports whether it is new.
func (r *recentIDs) add(id uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.set == nil {
		r.set = make(map[uint64]struct{}, len(r.ring))
	}
	if _, ok := r.set[id]; ok {
		return false
	}
	delete(r.set, r.ring[r.next])
	r.ring[r.next] = id
	r.set[id] = struct{}{}
	r.next = (r.next + 1) % len(r.ring)
	return true
}

// logWriter turns memberlist's log lines ("[LEVEL] memberlist: text") into
// structured lines: errors and warnings at the default verbosity, the rest
// only with -v.
type logWriter struct {
	log   logr.Logger
	quiet *atomic.Bool
}

func (w logWriter) Write(b []byte) (int, error) {
	if w.quiet != nil && w.quiet.Load() {
		return len(b), nil
	}
	line := strings.TrimSpace(string(b))
	level := ""
	if strings.HasPrefix(line, "[") {
		if i := strings.IndexByte(line, ']'); i > 0 {
			level, line = line[1:i], strings.TrimSpace(line[i+1:])
		}
	}
	line = strings.TrimPrefix(line, "memberlist: ")
	switch level {
	case "ERR", "ERROR", "WARN":
		w.log.Info(line, "severity", level)
	case "INFO":
		w.log.V(1).Info(line)
	default:
		w.log.V(2).Info(line)
	}
	return len(b), nil
}
