package proxy

import (
	"net/netip"
	"testing"
)

// FuzzSessionTable drives the UDP session table with a random sequence of
// adds and removes and checks it against a plain model: caps hold, counts
// agree, and a stale remove never deletes a newer session.
func FuzzSessionTable(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add([]byte{0x10, 0x10, 0x10, 0x90, 0x10, 0x11, 0x12, 0x13, 0x14})
	f.Add([]byte{0xff, 0x00, 0x80, 0x01, 0x81, 0x7f})
	f.Fuzz(func(t *testing.T, ops []byte) {
		const max, maxPerIP = 6, 3
		var tab sessionTable[int]
		tab.init(max, maxPerIP)
		model := map[netip.AddrPort]int{}
		next := 1
		for _, op := range ops {
			// Low bits pick one of 4 IPs and 4 ports; the high bit removes.
			ip := netip.AddrFrom4([4]byte{127, 0, 2, 1 + op&3})
			c := netip.AddrPortFrom(ip, 1000+uint16(op>>2&3))
			if op&0x80 != 0 {
				stale := op&0x40 != 0
				s := model[c]
				if stale {
					s = -1 // a session that was already replaced
				}
				tab.remove(c, s)
				if !stale {
					delete(model, c)
				}
				continue
			}
			if _, ok := model[c]; ok {
				continue // callers only add for clients without a session
			}
			perIP := 0
			for k := range model {
				if k.Addr() == ip {
					perIP++
				}
			}
			refused := tab.add(c, next)
			switch {
			case len(model) >= max:
				if refused != refusedSessionLimit {
					t.Fatalf("add past the total cap: %q", refused)
				}
			case perIP >= maxPerIP:
				if refused != refusedClientLimit {
					t.Fatalf("add past the per-IP cap: %q", refused)
				}
			default:
				if refused != "" {
					t.Fatalf("add refused below the caps: %q", refused)
				}
				model[c] = next
			}
			next++
		}
		if tab.len() != len(model) {
			t.Fatalf("table has %d sessions, model %d", tab.len(), len(model))
		}
		perIP := map[netip.Addr]int{}
		for c, s := range model {
			if got := tab.get(c); got != s {
				t.Fatalf("session of %s = %d, want %d", c, got, s)
			}
			perIP[c.Addr()]++
		}
		for ip, n := range perIP {
			if tab.perIP[ip] != n {
				t.Fatalf("per-IP count of %s = %d, want %d", ip, tab.perIP[ip], n)
			}
		}
		if len(tab.perIP) != len(perIP) {
			t.Fatalf("per-IP map keeps %d IPs, want %d", len(tab.perIP), len(perIP))
		}
	})
}
