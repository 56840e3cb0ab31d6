package maglev

import "net/netip"

// The flow hash is part of the contract between dataplane replicas: every
// replica, whatever its version, must turn the same client into the same
// number, or clients are re-pinned when replicas are rolled. Changing any
// constant or byte order in this file is a breaking change; the golden values
// in hash_test.go exist to catch it.

const (
	fnvOffset64 = 14695981039346656037
	fnvPrime64  = 1099511628211
)

// Hasher is an incremental, process-independent 64-bit hash: FNV-1a over the
// bytes written, followed by the murmur3 fmix64 finaliser so that the low bits
// (the ones hash % M uses) depend on every input bit.
//
// Unlike hash/maphash it has no per-process seed, so every replica computes
// the same value. The zero Hasher is ready to use; it is a plain value, so a
// caller can keep one on the stack and hash without allocating.
type Hasher struct {
	// x is the FNV state XORed with the offset basis, so the zero value starts at the basis.
	x uint64
}

// fnv1a folds b into the FNV-1a state v.
func fnv1a[T string | []byte](v uint64, b T) uint64 {
	for i := 0; i < len(b); i++ {
		v ^= uint64(b[i])
		v *= fnvPrime64
	}
	return v
}

// Reset returns h to its zero state.
func (h *Hasher) Reset() { h.x = 0 }

// WriteBytes adds b to the hash.
func (h *Hasher) WriteBytes(b []byte) {
	h.x = fnv1a(h.x^fnvOffset64, b) ^ fnvOffset64
}

// WriteString adds the bytes of s to the hash.
func (h *Hasher) WriteString(s string) {
	h.x = fnv1a(h.x^fnvOffset64, s) ^ fnvOffset64
}

// Write16 adds a 16-byte address (netip.Addr.As16 form) to the hash.
func (h *Hasher) Write16(ip [16]byte) {
	h.x = fnv1a(h.x^fnvOffset64, ip[:]) ^ fnvOffset64
}

// WriteUint8 adds one byte, such as an IP protocol number, to the hash.
func (h *Hasher) WriteUint8(b uint8) {
	v := h.x ^ fnvOffset64
	v ^= uint64(b)
	v *= fnvPrime64
	h.x = v ^ fnvOffset64
}

// WriteUint16 adds v, big-endian (network order, as for a port), to the hash.
func (h *Hasher) WriteUint16(v uint16) {
	h.WriteUint8(uint8(v >> 8))
	h.WriteUint8(uint8(v))
}

// WriteUint64 adds v, big-endian, to the hash.
func (h *Hasher) WriteUint64(v uint64) {
	for shift := 56; shift >= 0; shift -= 8 {
		h.WriteUint8(uint8(v >> shift))
	}
}

// Sum64 returns the finalised hash of everything written so far; h is unchanged.
func (h *Hasher) Sum64() uint64 {
	return fmix64(h.x ^ fnvOffset64)
}

// fmix64 is murmur3's 64-bit finaliser: a bijection that spreads every input
// bit over the whole word, which plain FNV does poorly for the low bits.
func fmix64(k uint64) uint64 {
	k ^= k >> 33
	k *= 0xff51afd7ed558ccd
	k ^= k >> 33
	k *= 0xc4ceb9fe1a85ec53
	k ^= k >> 33
	return k
}

// HashBytes returns the Hasher sum of b.
func HashBytes(b []byte) uint64 {
	var h Hasher
	h.WriteBytes(b)
	return h.Sum64()
}

// HashString returns the Hasher sum of s.
func HashString(s string) uint64 {
	var h Hasher
	h.WriteString(s)
	return h.Sum64()
}

// HashClient is the key for client-IP affinity: the client address in its
// 16-byte form, then the frontend. An IPv4 client and its IPv4-mapped IPv6
// form hash alike, and the zone is ignored.
func HashClient(client netip.Addr, frontend string) uint64 {
	var h Hasher
	h.Write16(client.As16())
	h.WriteString(frontend)
	return h.Sum64()
}

// HashClientProtocol is the key for client-IP-and-protocol affinity. The
// protocol byte comes before the variable-length frontend so the encoding is
// unambiguous.
func HashClientProtocol(client netip.Addr, frontend string, proto uint8) uint64 {
	var h Hasher
	h.Write16(client.As16())
	h.WriteUint8(proto)
	h.WriteString(frontend)
	return h.Sum64()
}

// HashFlow is the key for per-flow distribution: the 5-tuple as source
// address, source port, destination address, destination port, protocol.
func HashFlow(src, dst netip.AddrPort, proto uint8) uint64 {
	var h Hasher
	h.Write16(src.Addr().As16())
	h.WriteUint16(src.Port())
	h.Write16(dst.Addr().As16())
	h.WriteUint16(dst.Port())
	h.WriteUint8(proto)
	return h.Sum64()
}
