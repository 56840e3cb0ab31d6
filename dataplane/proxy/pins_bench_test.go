package proxy

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// benchClients is how many distinct clients BenchmarkChooseNewFlow cycles
// through: 10.0.0.0 and up, 256 per /24, well under the per-source cap.
const benchClients = 1 << 20

func benchClient(i int) netip.AddrPort {
	i %= benchClients
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 40000)
}

// BenchmarkChooseNewFlow is what a new TCP flow of a ClientIP rule costs
// before its backend is dialed: the client's hash and its backend, with the
// rule's pins off (sessionPersistenceTimeoutInMinutes: 0, the Maglev table
// only) and on, for a client already pinned (a lock-free lookup) and for a
// new client (a lookup that misses, then a pin under one shard's lock).
// make bench compares pins on and off end to end in hack/bench; this is the
// same comparison without the sockets, so without their noise.
func BenchmarkChooseNewFlow(b *testing.B) {
	for _, bc := range []struct {
		name  string
		pins  time.Duration
		known bool // the clients are pinned before the clock starts
	}{
		{"pins=off", 0, false},
		{"pins=on/known-client", 3 * time.Hour, true},
		{"pins=on/new-client", 3 * time.Hour, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			p, rs := benchRule(b, bc.pins)
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				_ = p.Shutdown(ctx)
			}()
			if (rs.pins != nil) != (bc.pins > 0) {
				b.Fatalf("the rule's pin table is %v with a pin timeout of %v", rs.pins, bc.pins)
			}
			frontend := netip.AddrPortFrom(rs.rule.Bind, rs.rule.Port)
			var cands [maxDialAttempts]*backend
			flow := func(i int) {
				client := benchClient(i)
				hash := flowHash(rs.rule, client, frontend, snapshot.TCP)
				if len(p.choose(rs, cands[:0], hash, client.Addr(), maxDialAttempts)) == 0 {
					b.Fatal("no backend")
				}
			}
			const known = 1 << 16
			if bc.known {
				for i := range known {
					flow(i)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				switch {
				case bc.known:
					i %= known
				case rs.pins != nil && i > 0 && i%benchClients == 0:
					// Every client has a pin now: start again from an
					// empty table, so that every flow is a new client's.
					b.StopTimer()
					rs.pins.Clear()
					b.StartTimer()
				}
				flow(i)
			}
			if rs.pins != nil {
				s := rs.pins.Stats()
				if s.Held == 0 {
					b.Fatal("no client was pinned")
				}
				if !bc.known && s.Created == 0 {
					b.Fatal("no pin was created")
				}
			}
		})
	}
}

// benchRule serves one ClientIP TCP rule over four backends (never dialed)
// with the given pin timeout, and returns its state.
func benchRule(b *testing.B, pinTimeout time.Duration) (*Proxy, *ruleState) {
	b.Helper()
	p, err := New(Options{Registerer: prometheus.NewRegistry(), MaxPins: 2 * benchClients})
	if err != nil {
		b.Fatal(err)
	}
	r := snapshot.Rule{
		Name: "default/bench", Frontend: "default/default", Bind: netip.MustParseAddr("127.0.0.1"), Port: testbackend.FreePort(b),
		Protocols: []snapshot.Protocol{snapshot.TCP}, Persistence: snapshot.PersistenceClientIP,
		IdleTimeout: 4 * time.Minute, PinTimeout: pinTimeout,
	}
	for i := range 4 {
		r.Backends = append(r.Backends, snapshot.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(1 + i)}), 9)})
	}
	s := &snapshot.Snapshot{Version: 1, Rules: []snapshot.Rule{r}}
	s.Normalize()
	failed, err := p.Apply(s)
	if err == nil {
		err = failed[r.Name]
	}
	if err != nil {
		b.Fatal(err)
	}
	p.mu.Lock()
	rs := p.rules[r.Name]
	p.mu.Unlock()
	if rs == nil {
		b.Fatal("the rule is not served")
	}
	return p, rs
}
