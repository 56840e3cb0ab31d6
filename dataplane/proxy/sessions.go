package proxy

import "net/netip"

// sessionTable maps client address:port to a UDP session, bounded in total
// and per client IP so that one source cannot exhaust it. The caller locks.
type sessionTable[S comparable] struct {
	byClient      map[netip.AddrPort]S
	perIP         map[netip.Addr]int
	max, maxPerIP int
}

func (t *sessionTable[S]) init(max, maxPerIP int) {
	t.byClient = map[netip.AddrPort]S{}
	t.perIP = map[netip.Addr]int{}
	t.max, t.maxPerIP = max, maxPerIP
}

func (t *sessionTable[S]) get(c netip.AddrPort) S { return t.byClient[c] }

func (t *sessionTable[S]) len() int { return len(t.byClient) }

// add stores s for c and returns "", or the refusal reason when a cap is
// reached. c must not have a session.
func (t *sessionTable[S]) add(c netip.AddrPort, s S) (refused string) {
	ip := c.Addr().Unmap()
	switch {
	case len(t.byClient) >= t.max:
		return refusedSessionLimit
	case t.perIP[ip] >= t.maxPerIP:
		return refusedClientLimit
	}
	t.byClient[c] = s
	t.perIP[ip]++
	return ""
}

// remove deletes c's session if it is still s (a newer session for the same
// client is left alone).
func (t *sessionTable[S]) remove(c netip.AddrPort, s S) {
	if cur, ok := t.byClient[c]; !ok || cur != s {
		return
	}
	delete(t.byClient, c)
	ip := c.Addr().Unmap()
	if t.perIP[ip] <= 1 {
		delete(t.perIP, ip)
	} else {
		t.perIP[ip]--
	}
}

func (t *sessionTable[S]) all() []S {
	out := make([]S, 0, len(t.byClient))
	for _, s := range t.byClient {
		out = append(out, s)
	}
	return out
}
