package proxy

import (
	"sync"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

func pinFor(d time.Duration) ruleOpt { return func(r *snapshot.Rule) { r.PinTimeout = d } }

func without(bs []*backendServer, name string) []*backendServer {
	var out []*backendServer
	for _, b := range bs {
		if b.Name != name {
			out = append(out, b)
		}
	}
	return out
}

func TestPinsSurvivePoolChanges(t *testing.T) {
	backends := startBackends(t, 5, 9031)
	four := backends[:4]
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, four, pinFor(time.Hour)))
	const clients = 400
	before := backendsOf(t, clients, port)

	// A fifth backend moves no pinned client...
	p.apply(t, rule("web", port, backends, pinFor(time.Hour)))
	after := backendsOf(t, clients, port)
	for i := range before {
		if after[i] != before[i] {
			t.Errorf("adding a backend moved %s from %s to %s", clientIP(i), before[i], after[i])
		}
	}
	// ...and new clients spread over the whole pool, the new backend included.
	fresh := map[string]int{}
	for i := clients; i < 2*clients; i++ {
		fresh[mustBackendOf(t, clientIP(i), port)]++
	}
	share := float64(fresh[backends[4].Name]) / clients
	if share < 0.12 || share > 0.28 {
		t.Errorf("the added backend got %.1f%% of new clients (%v), want about 20%%", 100*share, fresh)
	}
	if held := ruleMetric(t, p, "stickylb_pins", "default/web"); held != 2*clients {
		t.Errorf("stickylb_pins = %v, want %d", held, 2*clients)
	}

	// Removing a backend moves only its clients, spread over the others.
	removed := four[1].Name
	p.apply(t, rule("web", port, without(backends, removed), pinFor(time.Hour)))
	now := backendsOf(t, clients, port)
	spread := map[string]bool{}
	for i := range before {
		switch {
		case before[i] == removed:
			if now[i] == removed {
				t.Errorf("%s still on the removed backend", clientIP(i))
			}
			spread[now[i]] = true
		case now[i] != before[i]:
			t.Errorf("removing %s moved %s from %s to %s", removed, clientIP(i), before[i], now[i])
		}
	}
	if len(spread) < 3 {
		t.Errorf("the removed backend's clients all went to %v", spread)
	}
	// A client re-pinned is pinned for good: the backend coming back does
	// not take it back.
	p.apply(t, rule("web", port, backends, pinFor(time.Hour)))
	again := backendsOf(t, clients, port)
	for i := range now {
		if again[i] != now[i] {
			t.Errorf("re-adding %s moved %s from %s to %s", removed, clientIP(i), now[i], again[i])
		}
	}
}

// With sessionPersistenceTimeoutInMinutes 0 a client's backend is the
// table's pick: adding a backend moves about one client in five, to it, and
// at most Maglev's own disruption (under 1%) elsewhere.
func TestNoPinsIsMaglevOnly(t *testing.T) {
	backends := startBackends(t, 5, 9041)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends[:4]))
	const clients = 300
	before := backendsOf(t, clients, port)
	p.apply(t, rule("web", port, backends))
	after := backendsOf(t, clients, port)
	moved, elsewhere := 0, 0
	for i := range before {
		if after[i] != before[i] {
			moved++
			if after[i] != backends[4].Name {
				elsewhere++
				t.Logf("%s moved to %s, not to the new backend", clientIP(i), after[i])
			}
		}
	}
	if elsewhere > clients/100 {
		t.Errorf("%d of %d clients moved between the old backends, want at most 1%%", elsewhere, clients)
	}
	if moved < clients/10 {
		t.Errorf("only %d of %d clients moved to the new backend without pins", moved, clients)
	}
}

// linked connects proxies as peers would: what one announces, the others merge.
type linked struct {
	mu    sync.Mutex
	peers []*Proxy
	from  *Proxy
	sent  *int
}

func (l *linked) Announce(rule string, ps []pins.Pin) {
	l.mu.Lock()
	*l.sent += len(ps)
	l.mu.Unlock()
	for _, o := range l.peers {
		if o != l.from {
			o.MergePins(rule, ps)
		}
	}
}

func link(ps ...*Proxy) *int {
	var sent int
	for _, p := range ps {
		p.SetPinSync(&linked{peers: ps, from: p, sent: &sent})
	}
	return &sent
}

// ruleMetric reads a rule's series of a metric from the proxy's registry.
func ruleMetric(t *testing.T, p *testProxy, name, rule string) float64 {
	t.Helper()
	mfs, err := p.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "rule" && l.GetValue() == rule {
					if g := m.GetGauge(); g != nil {
						return g.GetValue()
					}
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{rule=%q}", name, rule)
	return 0
}

// Two replicas agree on a client pinned through one of them, after a pool
// change and after one restarts; only the pins that differ from the table
// travel.
func TestReplicasAgreeOnPins(t *testing.T) {
	backends := startBackends(t, 5, 9051)
	port1, port2 := freePort(t), freePort(t)
	p1, p2 := newProxy(t, Options{}), newProxy(t, Options{})
	sent := link(p1.Proxy, p2.Proxy)
	serve := func(p *testProxy, port uint16, bs []*backendServer) {
		p.apply(t, rule("web", port, bs, pinFor(time.Hour)))
	}
	serve(p1, port1, backends[:4])
	serve(p2, port2, backends[:4])
	const clients = 500
	via1 := backendsOf(t, clients, port1)
	if *sent != 0 {
		t.Errorf("%d pins sent while every pin agrees with the table", *sent)
	}
	serve(p1, port1, backends)
	serve(p2, port2, backends)
	via2 := backendsOf(t, clients, port2)
	for i := range via1 {
		if via2[i] != via1[i] {
			t.Errorf("%s: %s through replica 1, %s through replica 2 after the pool grew", clientIP(i), via1[i], via2[i])
		}
	}
	if *sent == 0 || *sent > clients/2 {
		t.Errorf("%d pins sent for %d clients, want about one in five", *sent, clients)
	}
	t.Logf("pins sent after adding a fifth backend: %d of %d clients", *sent, clients)

	// A replica that restarts learns the overriding pins before it serves.
	p3 := newProxy(t, Options{})
	p1.Overrides(func(rule string, ps []pins.Pin) { p3.MergePins(rule, ps) })
	port3 := freePort(t)
	serve(p3, port3, backends)
	via3 := backendsOf(t, clients, port3)
	for i := range via1 {
		if via3[i] != via1[i] {
			t.Errorf("%s: %s through replica 1, %s through the restarted replica", clientIP(i), via1[i], via3[i])
		}
	}
}

// Peers' pins arrive at any moment, also while a snapshot is being
// applied and before a rule's pool is built; run with -race.
func TestMergePinsDuringApply(t *testing.T) {
	backends := startBackends(t, 3, 9081)
	port := freePort(t)
	p := newProxy(t, Options{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := uint64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			now := pins.Now()
			p.MergePins("default/web", []pins.Pin{{Key: i, Backend: pins.BackendKey(backends[i%3].Addr.String()), Since: now, Seen: now}})
			p.Overrides(func(string, []pins.Pin) {})
		}
	})
	for i := range 200 {
		opts := []ruleOpt{pinFor(time.Hour)}
		if i%7 == 6 {
			opts = nil // stops pinning: its pins go
		}
		p.apply(t, rule("web", port, backends[:2+i%2], opts...))
	}
	close(stop)
	wg.Wait()
	p.apply(t, rule("web", port, backends, pinFor(time.Hour)))
	// The table the rule serves is the one peers merge into.
	p.MergePins("default/web", []pins.Pin{{Key: 1 << 62, Backend: pins.BackendKey(backends[2].Addr.String()), Since: pins.Now(), Seen: pins.Now()}})
	p.mu.Lock()
	rs := p.rules["default/web"]
	p.mu.Unlock()
	if _, ok := rs.pins.Get(1<<62, pins.Now()); !ok {
		t.Errorf("a peer's pin did not reach the served table")
	}
}
