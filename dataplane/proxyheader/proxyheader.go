// Package proxyheader writes PROXY protocol headers (HAProxy's
// doc/proxy-protocol.txt, versions 1 and 2): what a proxy sends a backend
// before a connection's first byte so that the backend learns the client's
// address and port and the address the client connected to.
//
// It only writes headers; backends and tests parse them with a library made
// for that. It depends on the standard library only.
package proxyheader

import (
	"encoding/binary"
	"net/netip"
	"strconv"
)

// Version is a PROXY protocol version.
type Version uint8

const (
	// V1 is the human-readable text header.
	V1 Version = 1
	// V2 is the binary header.
	V2 Version = 2
)

// signature opens every version 2 header.
var signature = [12]byte{0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a}

// Version 2 fields.
const (
	v2Local    = 0x20 // version 2, command LOCAL
	v2Proxy    = 0x21 // version 2, command PROXY
	v2Unspec   = 0x00
	v2TCP4     = 0x11 // AF_INET, SOCK_STREAM
	v2TCP6     = 0x21 // AF_INET6, SOCK_STREAM
	v2FixedLen = 16
)

// MaxLen is the longest header Append writes: version 1 over IPv6 (107
// bytes, the specification's bound).
const MaxLen = 107

// Append appends the header of a TCP connection from src that was accepted
// on dst. Addresses of different families are both written as IPv6 (an
// IPv4 address as IPv4-mapped); IPv4-mapped addresses of both ends as IPv4.
func Append(b []byte, v Version, src, dst netip.AddrPort) []byte {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	if s.Is4() != d.Is4() {
		s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
	}
	if v == V1 {
		fam := "TCP6 "
		if s.Is4() {
			fam = "TCP4 "
		}
		b = append(b, "PROXY "...)
		b = append(b, fam...)
		b = s.AppendTo(b)
		b = append(b, ' ')
		b = d.AppendTo(b)
		b = append(b, ' ')
		b = strconv.AppendUint(b, uint64(src.Port()), 10)
		b = append(b, ' ')
		b = strconv.AppendUint(b, uint64(dst.Port()), 10)
		return append(b, '\r', '\n')
	}
	b = append(b, signature[:]...)
	if s.Is4() {
		b = append(b, v2Proxy, v2TCP4, 0, 12)
		sa, da := s.As4(), d.As4()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	} else {
		b = append(b, v2Proxy, v2TCP6, 0, 36)
		sa, da := s.As16(), d.As16()
		b = append(b, sa[:]...)
		b = append(b, da[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

// Local is the header of a connection that carries no client: what health
// probes send. Version 2 uses the LOCAL command, version 1 "PROXY UNKNOWN".
func Local(v Version) []byte {
	if v == V1 {
		return []byte("PROXY UNKNOWN\r\n")
	}
	b := make([]byte, 0, v2FixedLen)
	b = append(b, signature[:]...)
	return append(b, v2Local, v2Unspec, 0, 0)
}
