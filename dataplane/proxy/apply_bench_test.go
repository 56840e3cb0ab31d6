package proxy

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// BenchmarkApplyOneRuleChanged serves 10,000 rules of 100 backends each
// (TCP listeners on 127.0.0.3, ports 20000 up) and measures one Apply of a
// snapshot in which one backend of one rule changed. The next snapshot
// shares every other rule's backends with the one served, as incremental
// translation builds it.
func BenchmarkApplyOneRuleChanged(b *testing.B) {
	const rules, backends = 10_000, 100
	p, err := New(Options{Registerer: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	cur := benchSnapshot(rules, backends)
	failed, err := p.Apply(cur)
	if err != nil {
		b.Fatal(err)
	}
	if len(failed) > 0 {
		b.Fatalf("%d listeners failed, such as %v", len(failed), failed)
	}
	i := 0
	for b.Loop() {
		b.StopTimer()
		next := &snapshot.Snapshot{Version: cur.Version + 1, Rules: slices.Clone(cur.Rules)}
		r := &next.Rules[(i*7919)%rules]
		r.Backends = slices.Clone(r.Backends)
		r.Backends[i%backends].Draining = !r.Backends[i%backends].Draining
		i++
		b.StartTimer()
		if _, err := p.Apply(next); err != nil {
			b.Fatal(err)
		}
		cur = next
	}
}

func benchSnapshot(rules, backends int) *snapshot.Snapshot {
	bind := netip.MustParseAddr("127.0.0.3")
	s := &snapshot.Snapshot{Version: 1, Rules: make([]snapshot.Rule, rules)}
	for i := range s.Rules {
		r := &s.Rules[i]
		*r = snapshot.Rule{
			Name: fmt.Sprintf("bench/r%05d", i), Frontend: "bench/default", Bind: bind, Port: uint16(20000 + i),
			Protocols: []snapshot.Protocol{snapshot.TCP}, Persistence: snapshot.PersistenceNone,
			IdleTimeout: 4 * time.Minute, Backends: make([]snapshot.Backend, backends),
		}
		for j := range r.Backends {
			n := i*backends + j
			r.Backends[j].Addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}), 8080)
		}
	}
	return s
}
