// Package maglev builds Maglev consistent-hashing lookup tables that pin
// clients to backends.
//
// A Table has a prime number M of slots; each slot holds one backend. A flow
// goes to the backend in slot hash % M, where hash is a flow key from
// HashClient, HashClientProtocol or HashFlow. The table is filled the way the
// Maglev paper describes: each backend walks its own permutation of the slots
// and the backends take turns claiming the next free slot on it. That gives
// every backend the same number of slots give or take one, and when the pool
// changes most slots keep their backend, so most clients stay where they are.
//
// Table size. Unless the caller passes one, M is the smallest prime of a
// fixed ladder (the largest prime below each power of two from 2^13 to 2^24)
// that is at least 100·N, which bounds the slot imbalance by 1%, and at
// least 4096·√N, which keeps the share of the other clients that move when
// one backend joins or leaves under 1% on average (that share goes roughly
// as M^-0.6·N^0.3, measured; 100·N alone gives 1.5–3% for pools of 5 to
// 300). So 1–3 backends get 8191 slots, 4–15 get 16381, 16–63 get 32749,
// 64–255 get 65521 and 256–1023 get 131071. The ladder is coarse on
// purpose: every change of M moves almost every client, so M changes only
// when a pool crosses a rung (3↔4, 15↔16, 63↔64, 255↔256, 1023↔1024,
// 2621↔2622 backends, ...), not at every change of N. See TestAutoSize,
// TestDisruptionAcrossPoolSizes and TestSizeReport.
//
// Determinism contract: Build is a pure function of the set of backend keys
// and the size, and the size it chooses is a pure function of the number of
// distinct keys. It sorts and de-duplicates its input and uses no per-process
// randomness, so every replica given the same pool, in any order, builds a
// bit-identical table and sends a client to the same backend without sharing
// state. The flow hash, the slot-filling order and the size rule are part of
// that contract: changing any of them re-pins clients whenever replicas of
// different versions run side by side. The size rule above replaced a fixed
// floor of 65537 slots, so replicas from before and after that change pick
// different backends for most clients of the same pool until all are rolled.
//
// Keys. A table hashes the strings it is given and nothing else. The proxy
// gives each backend's IP, not ip:port: the backends of one rule all
// listen on its backendPort, so rules over the same pods on different ports
// build one table and send a client (of one frontend, whose flow hash is
// the same) to the same pod on each. A rule with two backends at one IP
// keys them all by ip:port. The keys are part of the determinism contract
// too: replicas from before IP keys (which hashed ip:port) and after them
// pick different backends for most clients until all are rolled.
package maglev

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// MaxSize bounds an explicit table size; it keeps a bad setting from
// allocating gigabytes.
const MaxSize = 1 << 24

// slotsPerBackend is the minimum M/N ratio chosen automatically: every
// backend holds at least 100 slots and at most one more than any other, so
// the slot imbalance (most slots over fewest) is at most 1.01.
const slotsPerBackend = 100

// disruptionScale is k in the automatic bound M >= k·sqrt(N). Pools of fewer
// than about 1700 backends need more than 100 slots per backend to keep
// Maglev's own disruption under 1%: measured, the share of the other
// clients that move when one backend joins or leaves averages about
// 130·M^-0.6·N^0.3 percent, which is 0.9% on the line M = 4096·sqrt(N)
// whatever N, and less above it. With k = 2^12 and rungs just under powers
// of two, a rung 2^j holds pools up to 4^(j-12) - 1 backends.
const disruptionScale = 4096

// sizes are the primes Build chooses from when no size is given: the largest
// prime below 2^k for k = 13..24, so each rung doubles the one before.
var sizes = [...]uint64{8191, 16381, 32749, 65521, 131071, 262139, 524287,
	1048573, 2097143, 4194301, 8388593, 16777213}

var (
	// ErrInvalidSize reports an explicit size that is not a usable prime.
	ErrInvalidSize = errors.New("maglev: invalid table size")
	// ErrTooManyBackends reports a pool larger than the chosen size can balance.
	ErrTooManyBackends = errors.New("maglev: too many backends")
)

// Seeds for the two independent per-backend hashes; fixed because they are
// part of the determinism contract.
const (
	offsetSeed = 0x6d61676c65762d6f // "maglev-o"
	skipSeed   = 0x6d61676c65762d73 // "maglev-s"
)

// Table is an immutable Maglev lookup table. It is safe for concurrent use.
type Table struct {
	backends []string // sorted, distinct
	size     uint64   // M, prime
	// Exactly one of tiny, small and large holds the M slots (none when
	// there are no backends): the narrowest type the backend indices fit in,
	// since a proxy holds one table per rule.
	tiny  []uint8
	small []uint16
	large []uint32
}

// Build returns the table for the given backends. Order and duplicates in
// backends do not matter. A size of 0 picks the size from the number of
// distinct backends as the package documentation describes (8191 slots for
// up to 3 backends, 65521 for 100, 131071 for 1000); an explicit size must
// be a prime no smaller than the number of backends and at most MaxSize.
// With no backends the table answers every Lookup with -1.
func Build(backends []string, size uint64) (*Table, error) {
	keys := slices.Clone(backends)
	slices.Sort(keys)
	keys = slices.Compact(keys)

	m, err := chooseSize(len(keys), size)
	if err != nil {
		return nil, err
	}
	t := &Table{backends: slices.Clip(keys), size: m}
	switch {
	case len(keys) == 0:
	case len(keys) < math.MaxUint8:
		t.tiny = make([]uint8, m)
		fill(t.tiny, keys, math.MaxUint8)
	case len(keys) < math.MaxUint16:
		t.small = make([]uint16, m)
		fill(t.small, keys, math.MaxUint16)
	default:
		t.large = make([]uint32, m)
		fill(t.large, keys, math.MaxUint32)
	}
	return t, nil
}

// chooseSize validates an explicit size or picks one for n backends.
func chooseSize(n int, size uint64) (uint64, error) {
	if size != 0 {
		if size > MaxSize || !isPrime(size) {
			return 0, fmt.Errorf("%w: %d is not a prime in [2, %d]", ErrInvalidSize, size, MaxSize)
		}
		if uint64(n) > size {
			return 0, fmt.Errorf("%w: %d backends do not fit in %d slots", ErrTooManyBackends, n, size)
		}
		return size, nil
	}
	for _, s := range sizes {
		// s >= k·sqrt(n) without floating point: s² >= k²·n (s² < 2^49).
		if s >= uint64(n)*slotsPerBackend && s*s >= disruptionScale*disruptionScale*uint64(n) {
			return s, nil
		}
	}
	return 0, fmt.Errorf("%w: %d backends need more than %d slots; pass an explicit size",
		ErrTooManyBackends, n, sizes[len(sizes)-1])
}

// CompactSize is the smallest rung of the same ladder that holds n backends
// at 100 slots each, without the √N floor: the slot imbalance stays at most
// 1%, and Maglev's own disruption is 1.5–3% of the other clients for pools
// of 5 to 300 instead of under 1%. It is for callers whose clients do not
// follow the table after a pool change (the proxy's pinned rules, whose
// clients keep their backend through their pin, and 5-tuple rules, where
// every connection is new): for them disruption only decides how many
// pins differ from the table, and the table is a quarter of the size for a
// pool of 100 (16381 slots against 65521). Like the automatic size it is a
// pure function of n.
func CompactSize(n int) (uint64, error) {
	for _, s := range sizes {
		if s >= uint64(n)*slotsPerBackend {
			return s, nil
		}
	}
	return 0, fmt.Errorf("%w: %d backends need more than %d slots", ErrTooManyBackends, n, sizes[len(sizes)-1])
}

// isPrime is trial division; sizes are at most MaxSize so this is cheap.
func isPrime(n uint64) bool {
	if n < 2 {
		return false
	}
	for d := uint64(2); d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// slotIndex is the entry type of a table: a backend index, with the all-ones
// value reserved to mark an unclaimed slot while filling.
type slotIndex interface{ ~uint8 | ~uint16 | ~uint32 }

// fill runs the Maglev population: backends take turns, in sorted order, to
// claim the next free slot on their own permutation until every slot is taken.
func fill[E slotIndex](entries []E, keys []string, empty E) {
	m := uint64(len(entries))
	for i := range entries {
		entries[i] = empty
	}
	walkers := make([]walker, len(keys))
	for i, k := range keys {
		walkers[i] = walker{
			next: backendHash(offsetSeed, k) % m,
			skip: backendHash(skipSeed, k)%(m-1) + 1,
		}
	}
	var filled uint64
	for {
		for i := range walkers {
			w := &walkers[i]
			for entries[w.next] != empty {
				w.advance(m)
			}
			entries[w.next] = E(i)
			w.advance(m)
			if filled++; filled == m {
				return
			}
		}
	}
}

// walker is one backend's position on its permutation of the slots,
// (offset + j*skip) % m. skip in [1, m-1] with m prime visits every slot.
type walker struct{ next, skip uint64 }

// advance steps to the next slot of the permutation without a division.
func (w *walker) advance(m uint64) {
	w.next += w.skip
	if w.next >= m {
		w.next -= m
	}
}

// backendHash is one of the two independent hashes of a backend key that
// place its permutation.
func backendHash(seed uint64, key string) uint64 {
	var h Hasher
	h.WriteUint64(seed)
	h.WriteString(key)
	return h.Sum64()
}

// Lookup returns the index of the backend for a flow hash, or -1 when the
// table has no backends. It does not allocate.
func (t *Table) Lookup(hash uint64) int {
	if t.tiny != nil {
		return int(t.tiny[hash%t.size])
	}
	if t.small != nil {
		return int(t.small[hash%t.size])
	}
	if t.large != nil {
		return int(t.large[hash%t.size])
	}
	return -1
}

// slot returns the backend index in slot s, which must be < t.size.
func (t *Table) slot(s uint64) int {
	if t.tiny != nil {
		return int(t.tiny[s])
	}
	if t.small != nil {
		return int(t.small[s])
	}
	return int(t.large[s])
}

// Backend returns the key of backend i, as passed to Build.
func (t *Table) Backend(i int) string { return t.backends[i] }

// Backends returns the distinct backend keys in index order.
func (t *Table) Backends() []string { return slices.Clone(t.backends) }

// Len returns the number of distinct backends.
func (t *Table) Len() int { return len(t.backends) }

// Size returns the number of slots, M.
func (t *Table) Size() uint64 { return t.size }

// Bytes returns the memory the slots take: M times the entry width, which is
// 1 byte for fewer than 255 backends, 2 for fewer than 65535, 4 above.
func (t *Table) Bytes() int {
	return len(t.tiny) + 2*len(t.small) + 4*len(t.large)
}

// Preference returns the first n distinct backends for a flow hash, in the
// order a dial should try them; see AppendPreference.
func (t *Table) Preference(hash uint64, n int) []int {
	return t.AppendPreference(make([]int, 0, min(max(n, 0), t.Len())), hash, n)
}

// AppendPreference appends to dst the first n distinct backends met walking
// forward from the flow's slot (hash % M, then +1, wrapping), so the first is
// Lookup(hash) and the rest are deterministic fallbacks that every replica
// agrees on. n is clamped to Len. It does not allocate when dst has room and
// the table has at most 1024 backends.
func (t *Table) AppendPreference(dst []int, hash uint64, n int) []int {
	n = min(n, t.Len())
	if n <= 0 {
		return dst
	}
	// seen is a bitset of backends already appended; on the stack for small pools.
	var stack [16]uint64
	seen := stack[:]
	if words := (t.Len() + 63) / 64; words > len(stack) {
		seen = make([]uint64, words)
	}
	s := hash % t.size
	// Every backend owns at least one slot, so one lap finds all of them.
	for range t.size {
		b := t.slot(s)
		if seen[b/64]&(1<<(b%64)) == 0 {
			seen[b/64] |= 1 << (b % 64)
			dst = append(dst, b)
			if n--; n == 0 {
				break
			}
		}
		if s++; s == t.size {
			s = 0
		}
	}
	return dst
}
