package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Answer is where a rule sends a client's next new flow on this replica,
// as acceptTCP or a new UDP session would decide it now.
type Answer struct {
	Rule string `json:"rule"`
	// Backends is the preference order: the first takes the flow, the
	// others are tried if it fails to connect. Empty when the rule refuses
	// new flows (no backend takes them).
	Backends []string `json:"backends"`
	// Pinned: the client has a pin to Backends[0], made Since.
	Pinned bool      `json:"pinned"`
	Since  time.Time `json:"since,omitzero"`
	// Overrides: the pin differs from the Maglev table's pick.
	Overrides bool `json:"overridesTable,omitempty"`
	// TablePick is the table's first pick, which differs from Backends[0]
	// only when a pin overrides it.
	TablePick string `json:"tablePick,omitempty"`
	// ProbeDownFallback: every backend fails its probe and the rule's
	// AllProbedUp sends flows to them anyway.
	ProbeDownFallback bool `json:"probeDownFallback,omitempty"`
	// Snapshot is the configuration version the answer comes from.
	Snapshot uint64 `json:"snapshot"`
}

// ErrNoSingleAnswer is Where's answer for a rule without session
// persistence, where every connection hashes its own 5-tuple.
var ErrNoSingleAnswer = errors.New("sessionPersistence None hashes each connection's 5-tuple: a client has no single backend")

// Where answers where the rule would send a new flow of proto from client,
// without side effects: no pin is made or extended.
func (p *Proxy) Where(rule string, client netip.Addr, proto snapshot.Protocol) (Answer, error) {
	p.mu.Lock()
	rs, ok := p.rules[rule]
	var version uint64
	if p.current != nil {
		version = p.current.Version
	}
	p.mu.Unlock()
	if !ok {
		return Answer{}, fmt.Errorf("rule %s is not served here", rule)
	}
	if !rs.rule.Serves(proto) {
		return Answer{}, fmt.Errorf("rule %s does not serve %s", rule, proto)
	}
	if rs.rule.Persistence == snapshot.PersistenceNone {
		return Answer{}, ErrNoSingleAnswer
	}
	a := Answer{Rule: rule, Snapshot: version, Backends: []string{}}
	hash := flowHash(rs.rule, netip.AddrPortFrom(client, 0), netip.AddrPort{}, proto)
	pl := rs.pool.Load()
	var buf [maxDialAttempts]*backend
	table := pl.pick(buf[:0], hash, maxDialAttempts)
	if len(table) == 0 {
		return a, nil
	}
	a.TablePick = table[0].addr.String()
	a.ProbeDownFallback = pl.healthy == 0
	order := table
	if rs.pins != nil {
		if pin, ok := rs.pins.Get(hash, pins.Now()); ok {
			if b := pl.byPin(pin.Backend); b != nil {
				a.Pinned, a.Since = true, time.Unix(int64(pin.Since), 0).UTC()
				a.Overrides = b != table[0]
				order = append([]*backend{b}, withoutBackend(table, b)...)[:min(len(table), maxDialAttempts)]
			}
		}
	}
	for _, b := range order {
		a.Backends = append(a.Backends, b.addr.String())
	}
	return a, nil
}

func withoutBackend(bs []*backend, x *backend) []*backend {
	out := make([]*backend, 0, len(bs))
	for _, b := range bs {
		if b != x {
			out = append(out, b)
		}
	}
	return out
}
