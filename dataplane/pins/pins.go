// Package pins holds the pin table: which backend each client of a rule is
// pinned to, so that a client keeps its backend when the pool grows or
// shrinks around it, until its backend stops taking new flows or the client
// has been quiet for the rule's timeout.
//
// A Table is read on every new flow, so readers take no lock: a lookup is
// a few atomic loads on an open-addressing array that writers replace
// wholesale when they grow it. Writers (a new client, a re-pin, a peer's pin,
// a sweep) take the lock of one of the table's shards.
//
// A table is bounded. Limits caps the pins of every table that shares it
// (one replica) and the pins of one client source (an IPv4 /24, an IPv6
// /64) in one table. A full table never evicts a pin that is still within
// its timeout: a new client beyond a cap is served from the Maglev table
// without a pin, so a flood of new addresses cannot push out active clients.
// Pins leave only by expiry (the sweep, or a lookup that finds them expired).
//
// The package knows nothing about peers: Reconcile returns the pins worth
// telling other replicas about, and Merge takes theirs.
//
// It depends on the standard library only.
package pins

import (
	"hash/fnv"
	"math/bits"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Pin is one client's pin, as stored and as exchanged with peers. Times are
// Unix seconds.
type Pin struct {
	// Key is the client's persistence hash under its rule (client IP and
	// frontend, plus the protocol under ClientIPProtocol).
	Key uint64
	// Backend is the BackendKey of the backend the client is pinned to.
	Backend uint64
	// Gen counts the times this client was pinned again to another backend;
	// of two pins for one client, the higher Gen is the newer decision.
	Gen uint32
	// Since is when the client was pinned to Backend.
	Since uint32
	// Seen is when the client last started a flow.
	Seen uint32
}

// Wins reports whether p should replace q, both pins of the same client, on
// every replica that holds both: the higher generation wins, then the older
// pin (the session that was there first), then the lower backend key. The
// order is total, so replicas that exchange their pins converge.
func (p Pin) Wins(q Pin) bool {
	if p.Gen != q.Gen {
		return p.Gen > q.Gen
	}
	if p.Since != q.Since {
		return p.Since < q.Since
	}
	return p.Backend < q.Backend
}

// BackendKey is the key a backend is pinned by: a fixed hash of its address
// ("ip:port", as netip.AddrPort prints it), the same on every replica.
func BackendKey(addr string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(addr))
	return h.Sum64()
}

// Source is a client's source network, the unit of the per-source cap: the
// /24 of an IPv4 address, the /64 of an IPv6 one. 0 is no source (a pin a
// peer made), which no per-source cap counts.
type Source uint32

// SourceOf returns the source network of a client address.
func SourceOf(ip netip.Addr) Source {
	ip = ip.Unmap()
	if ip.Is4() {
		b := ip.As4()
		return Source(uint32(b[0])<<16|uint32(b[1])<<8|uint32(b[2])) + 1
	}
	b := ip.As16()
	h := fnv.New32a()
	_, _ = h.Write(b[:8])
	return Source(h.Sum32() | 1<<31)
}

// Now is the current time in the unit pins use.
func Now() uint32 { return uint32(time.Now().Unix()) }

// Limits bound the pins of every table made with them.
type Limits struct {
	// MaxPins caps the pins of all tables together (one replica).
	MaxPins int64
	// MaxPerSource caps the pins of one Source in one table.
	MaxPerSource int32

	held atomic.Int64
}

// Held is the number of pins all tables hold together.
func (l *Limits) Held() int64 { return l.held.Load() }

// Result says what Pin did.
type Result uint8

const (
	// Created: the client had no pin and now has one.
	Created Result = iota
	// Kept: the client was already pinned to this backend.
	Kept
	// Repinned: the client was pinned to another backend, and now to this one.
	Repinned
	// RefusedFull: the replica's cap is reached; the client has no pin.
	RefusedFull
	// RefusedSource: the client's source network has its cap of pins.
	RefusedSource
)

const (
	shardBits = 4
	nShards   = 1 << shardBits
	minSlots  = 8
)

// Reserved keys: a client whose hash is one of these is stored as keyFix.
const (
	keyEmpty     = 0
	keyTombstone = 1
	keyFix       = 2
)

// flag bits, kept above the generation in meta.
const (
	flagOverride  = 1 << 31 // the pin differs from the table's pick
	flagAnnounced = 1 << 30 // the override has been handed to the peers
	genMask       = flagAnnounced - 1
)

// slot is one entry of a shard's array: 32 bytes. key is written once, when
// the slot is taken (later only tombstoned), so a reader that matches key
// reads that client's backend, maybe a moment old.
type slot struct {
	key     atomic.Uint64
	backend atomic.Uint64
	meta    atomic.Uint64 // flags and gen in the high half, since in the low half
	seen    atomic.Uint32
	source  Source // writers only
}

type shard struct {
	mu    sync.Mutex
	slots atomic.Pointer[[]slot]
	live  int // pins held
	used  int // live plus tombstones
	// sources counts the pins of each source in this shard.
	sources map[Source]int32
}

// Table is one rule's pins. Its zero value is not usable; call New.
type Table struct {
	lim     *Limits
	timeout atomic.Uint32 // seconds
	shards  [nShards]shard

	created, expired atomic.Uint64
	overriding       atomic.Int64
}

// New returns an empty table whose pins last timeout after their client's
// last flow, bounded by lim (shared by every table of a replica).
func New(timeout time.Duration, lim *Limits) *Table {
	t := &Table{lim: lim}
	t.SetTimeout(timeout)
	return t
}

// SetTimeout changes how long pins outlive their client's last flow.
func (t *Table) SetTimeout(d time.Duration) {
	t.timeout.Store(uint32(max(d/time.Second, 1)))
}

// Timeout is how long pins outlive their client's last flow.
func (t *Table) Timeout() time.Duration { return time.Duration(t.timeout.Load()) * time.Second }

// Stats are a table's counters.
type Stats struct {
	Held       int
	Overriding int64
	Created    uint64
	Expired    uint64
}

// Stats returns the table's counters: pins held, pins overriding the
// table's pick (as of the last Reconcile), and pins created and expired.
func (t *Table) Stats() Stats {
	s := Stats{Overriding: t.overriding.Load(), Created: t.created.Load(), Expired: t.expired.Load()}
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		s.Held += sh.live
		sh.mu.Unlock()
	}
	return s
}

func fixKey(k uint64) uint64 {
	if k < keyFix {
		return k + keyFix
	}
	return k
}

// shard and home spread keys with two independent multiplicative hashes:
// a key is usually a hash already, but one that is not (a test, a peer's
// message) must not cluster in one shard or one run of slots.
func (t *Table) shard(key uint64) *shard {
	return &t.shards[((key^key>>31)*0xbf58476d1ce4e5b9)>>(64-shardBits)]
}

// home is the slot where the probe for key starts in an array of n slots,
// n a power of two.
func home(key uint64, n int) uint64 {
	return (key * 0x9e3779b97f4a7c15) >> (64 - bits.TrailingZeros(uint(n)))
}

// expired reports whether a pin last seen at seen has outlived timeout at
// now. A Seen from a peer's clock may be ahead of ours.
func expired(seen, now, timeout uint32) bool {
	return int64(now)-int64(seen) > int64(timeout)
}

// find returns the slot holding key in s, or nil.
func find(s []slot, key uint64) *slot {
	if len(s) == 0 {
		return nil
	}
	mask := uint64(len(s) - 1)
	for i := home(key, len(s)); ; i = (i + 1) & mask {
		switch sl := &s[i]; sl.key.Load() {
		case key:
			return sl
		case keyEmpty:
			return nil
		}
	}
}

// Lookup returns the backend the client with this key is pinned to, and
// records a flow of the client (its pin lasts another timeout). It takes no
// lock and does not allocate. An expired pin is no pin.
func (t *Table) Lookup(key uint64, now uint32) (backend uint64, ok bool) {
	key = fixKey(key)
	p := t.shard(key).slots.Load()
	if p == nil {
		return 0, false
	}
	sl := find(*p, key)
	if sl == nil {
		return 0, false
	}
	seen := sl.seen.Load()
	if expired(seen, now, t.timeout.Load()) {
		return 0, false
	}
	if int32(now-seen) > 0 {
		sl.seen.Store(now)
	}
	return sl.backend.Load(), true
}

// Get returns the client's pin without recording a flow.
func (t *Table) Get(key uint64, now uint32) (Pin, bool) {
	key = fixKey(key)
	sh := t.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	sl := sh.find(key)
	if sl == nil || expired(sl.seen.Load(), now, t.timeout.Load()) {
		return Pin{}, false
	}
	return sl.pin(), true
}

func (sh *shard) find(key uint64) *slot {
	p := sh.slots.Load()
	if p == nil {
		return nil
	}
	return find(*p, key)
}

func (sl *slot) pin() Pin {
	m := sl.meta.Load()
	return Pin{Key: sl.key.Load(), Backend: sl.backend.Load(), Gen: uint32(m>>32) & genMask, Since: uint32(m), Seen: sl.seen.Load()}
}

func (sl *slot) set(p Pin, flags uint32) {
	sl.backend.Store(p.Backend)
	sl.meta.Store(uint64(p.Gen&genMask|flags)<<32 | uint64(p.Since))
	sl.seen.Store(p.Seen)
}

func (sl *slot) flags() uint32 { return uint32(sl.meta.Load()>>32) &^ genMask }

func (sl *slot) setFlags(f uint32) {
	m := sl.meta.Load()
	sl.meta.Store(m&^(uint64(^uint32(genMask))<<32) | uint64(f)<<32)
}

// Pin pins the client with key, from source src, to backend: the pick it
// was just given because it had no pin, or because its pinned backend no
// longer takes new flows. It returns the pin as stored.
func (t *Table) Pin(key, backend uint64, src Source, now uint32) (Pin, Result) {
	key = fixKey(key)
	sh := t.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sl := sh.find(key); sl != nil {
		old := sl.pin()
		if expired(old.Seen, now, t.timeout.Load()) {
			// Forgotten: a fresh pin in the same slot.
			t.expired.Add(1)
			t.created.Add(1)
			p := Pin{Key: key, Backend: backend, Since: now, Seen: now}
			sl.set(p, 0)
			return p, Created
		}
		if old.Backend == backend {
			if int32(now-old.Seen) > 0 {
				sl.seen.Store(now)
			}
			old.Seen = max(old.Seen, now)
			return old, Kept
		}
		p := Pin{Key: key, Backend: backend, Gen: old.Gen + 1, Since: now, Seen: now}
		sl.set(p, 0)
		return p, Repinned
	}
	if t.lim.held.Add(1) > t.lim.MaxPins {
		t.lim.held.Add(-1)
		return Pin{}, RefusedFull
	}
	if src != 0 && sh.sourceCount(src) >= t.lim.MaxPerSource {
		t.lim.held.Add(-1)
		return Pin{}, RefusedSource
	}
	p := Pin{Key: key, Backend: backend, Since: now, Seen: now}
	sh.insert(p, src, 0)
	t.created.Add(1)
	return p, Created
}

// sourceCount is the per-source count the cap compares with. Pins spread
// evenly over the shards by their key hash, so each shard caps a source at
// its share, 1/nShards of the cap: that bounds the source over the whole
// table without a lock shared between shards. (A source at the cap may
// therefore be refused a little before it holds MaxPerSource pins.)
func (sh *shard) sourceCount(src Source) int32 {
	return sh.sources[src] * nShards
}

// insert stores a new pin; sh.mu is held and the key is absent.
func (sh *shard) insert(p Pin, src Source, flags uint32) {
	p2 := sh.slots.Load()
	if p2 == nil || (sh.used+1)*4 > len(*p2)*3 {
		sh.grow()
		p2 = sh.slots.Load()
	}
	s := *p2
	mask := uint64(len(s) - 1)
	i := home(p.Key, len(s))
	for s[i].key.Load() != keyEmpty {
		i = (i + 1) & mask
	}
	sl := &s[i]
	sl.source = src
	sl.set(p, flags)
	sl.key.Store(p.Key) // last: a reader that matches the key finds the rest set
	sh.live++
	sh.used++
	if src != 0 {
		if sh.sources == nil {
			sh.sources = map[Source]int32{}
		}
		sh.sources[src]++
	}
}

// grow replaces the array with one sized for twice the live pins, without
// tombstones. Readers still on the old array see the pins as they were.
func (sh *shard) grow() {
	n := minSlots
	for n < (sh.live+1)*2 {
		n *= 2
	}
	fresh := make([]slot, n)
	mask := uint64(n - 1)
	if old := sh.slots.Load(); old != nil {
		for j := range *old {
			o := &(*old)[j]
			k := o.key.Load()
			if k == keyEmpty || k == keyTombstone {
				continue
			}
			i := home(k, n)
			for fresh[i].key.Load() != keyEmpty {
				i = (i + 1) & mask
			}
			f := &fresh[i]
			f.backend.Store(o.backend.Load())
			f.meta.Store(o.meta.Load())
			f.seen.Store(o.seen.Load())
			f.source = o.source
			f.key.Store(k)
		}
	}
	sh.used = sh.live
	sh.slots.Store(&fresh)
}

// remove tombstones sl; sh.mu is held.
func (t *Table) remove(sh *shard, sl *slot) {
	sl.key.Store(keyTombstone)
	sh.live--
	t.lim.held.Add(-1)
	if src := sl.source; src != 0 {
		if sh.sources[src]--; sh.sources[src] <= 0 {
			delete(sh.sources, src)
		}
	}
}

// Merge takes a pin from a peer. The peer's pin replaces ours when ours has
// expired, when our backend no longer takes new flows here (alive reports
// whether a backend does), or when the peer's pin Wins. It returns the pin
// now stored and whether it is the peer's; when it is ours and differs from
// the peer's, ours should go back to the peer. An expired peer pin, or one
// beyond the replica's cap, changes nothing.
func (t *Table) Merge(p Pin, now uint32, alive func(backend uint64) bool) (stored Pin, took bool) {
	p.Key = fixKey(p.Key)
	timeout := t.timeout.Load()
	if expired(p.Seen, now, timeout) {
		return Pin{}, false
	}
	sh := t.shard(p.Key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	// A peer's pin is one the network knows already: it needs no announcing.
	const flags = flagAnnounced
	sl := sh.find(p.Key)
	if sl == nil {
		if t.lim.held.Add(1) > t.lim.MaxPins {
			t.lim.held.Add(-1)
			return Pin{}, false
		}
		sh.insert(p, 0, flags)
		t.created.Add(1)
		return p, true
	}
	ours := sl.pin()
	switch {
	case expired(ours.Seen, now, timeout):
		t.expired.Add(1)
		t.created.Add(1)
	case ours.Backend == p.Backend:
		// The same backend: the pin that wins, with the latest flow of both.
		if p.Wins(ours) {
			ours.Gen, ours.Since = p.Gen, p.Since
		}
		ours.Seen = max(ours.Seen, p.Seen)
		sl.set(ours, sl.flags()|flags)
		return ours, true
	case alive(ours.Backend) && !p.Wins(ours):
		return ours, false
	}
	sl.set(p, flags)
	return p, true
}

// Reconcile walks the table after the rule's pool changed, and
// periodically. It drops expired pins, marks each live pin whose backend
// still takes new flows (alive) as overriding when it differs from the
// table's pick for its key (pick), and returns the overriding pins the peers
// have not been told about, plus, when refresh is not 0, those whose client had a flow at or after
// refresh (so that a peer's copy does not expire while the client is active
// here). Pins whose backend is gone are left for their client's next flow
// to re-pin, or for expiry. pick must not take locks that a caller of
// Lookup or Pin holds.
func (t *Table) Reconcile(now, refresh uint32, pick func(key uint64) uint64, alive func(backend uint64) bool) (announce []Pin) {
	timeout := t.timeout.Load()
	var overriding int64
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		if p := sh.slots.Load(); p != nil {
			for j := range *p {
				sl := &(*p)[j]
				k := sl.key.Load()
				if k == keyEmpty || k == keyTombstone {
					continue
				}
				pin := sl.pin()
				if expired(pin.Seen, now, timeout) {
					t.remove(sh, sl)
					t.expired.Add(1)
					continue
				}
				f := sl.flags()
				if !alive(pin.Backend) {
					continue
				}
				if pick(k) == pin.Backend {
					if f&flagOverride != 0 {
						sl.setFlags(0)
					}
					continue
				}
				overriding++
				if f&flagAnnounced == 0 || (refresh != 0 && int32(pin.Seen-refresh) >= 0) {
					announce = append(announce, pin)
				}
				if f != flagOverride|flagAnnounced {
					sl.setFlags(flagOverride | flagAnnounced)
				}
			}
		}
		sh.mu.Unlock()
	}
	t.overriding.Store(overriding)
	return announce
}

// Overrides returns the live pins that differ from the table's pick for
// their key (pick) and whose backend takes new flows (alive): what a replica
// that joins must learn. With a nil pick it returns every live pin (a table
// for a rule this replica does not serve yet).
func (t *Table) Overrides(now uint32, pick func(key uint64) uint64, alive func(backend uint64) bool) []Pin {
	timeout := t.timeout.Load()
	var out []Pin
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		if p := sh.slots.Load(); p != nil {
			for j := range *p {
				sl := &(*p)[j]
				if k := sl.key.Load(); k == keyEmpty || k == keyTombstone {
					continue
				}
				pin := sl.pin()
				if expired(pin.Seen, now, timeout) {
					continue
				}
				if pick == nil || (alive(pin.Backend) && pick(pin.Key) != pin.Backend) {
					out = append(out, pin)
				}
			}
		}
		sh.mu.Unlock()
	}
	return out
}

// CountByBackend returns how many live pins each backend holds.
func (t *Table) CountByBackend(now uint32) map[uint64]int {
	timeout := t.timeout.Load()
	out := map[uint64]int{}
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		if p := sh.slots.Load(); p != nil {
			for j := range *p {
				sl := &(*p)[j]
				if k := sl.key.Load(); k == keyEmpty || k == keyTombstone || expired(sl.seen.Load(), now, timeout) {
					continue
				}
				out[sl.backend.Load()]++
			}
		}
		sh.mu.Unlock()
	}
	return out
}

// Clear drops every pin.
func (t *Table) Clear() {
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		t.lim.held.Add(-int64(sh.live))
		sh.slots.Store(nil)
		sh.live, sh.used, sh.sources = 0, 0, nil
		sh.mu.Unlock()
	}
	t.overriding.Store(0)
}

// SlotBytes is the memory of one slot; a table holds between 4/3 and 4
// slots per pin (see grow), about 2 on average.
const SlotBytes = 32
