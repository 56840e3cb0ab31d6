package proxy

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/health"
	"github.com/stickylb/stickylb/dataplane/pins"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

func poolRule(n int, draining ...int) *snapshot.Rule {
	r := &snapshot.Rule{Name: "default/pool", Frontend: "default/default", Bind: netip.MustParseAddr("127.0.0.1"), Port: 80,
		Protocols: []snapshot.Protocol{snapshot.TCP}, Persistence: snapshot.PersistenceClientIP, IdleTimeout: time.Minute,
		Probe: &snapshot.Probe{Protocol: snapshot.ProbeTCP, Interval: time.Second, Threshold: 1}}
	for i := range n {
		r.Backends = append(r.Backends, snapshot.Backend{Addr: netip.MustParseAddrPort(fmt.Sprintf("10.0.0.%d:8080", i+1))})
	}
	for _, i := range draining {
		r.Backends[i].Draining = true
	}
	return r
}

// downStatus reports the backends at the given addresses down, all others up.
func downStatus(down ...string) func(health.Target) (bool, bool) {
	return func(t health.Target) (bool, bool) {
		for _, d := range down {
			if t.Addr.String() == d {
				return false, true
			}
		}
		return true, true
	}
}

// The pool's indexes agree with the table and with the rule: picks follow
// the table's order, byPin finds exactly the backends that take new flows,
// and isAlive keeps the sessions of backends present and not probed down,
// also for a backend of the rule's previous configuration.
func TestPoolIndexes(t *testing.T) {
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	r := poolRule(20, 3)
	rs := newRuleState(r, m)
	rs.rebuild(downStatus("10.0.0.5"), m)
	pl := rs.pool.Load()
	if pl.healthy != 18 || pl.active != 19 || len(pl.picks) != 18 || pl.table.Len() != 18 {
		t.Fatalf("healthy %d, active %d, picks %d, table %d; want 18, 19, 18, 18", pl.healthy, pl.active, len(pl.picks), pl.table.Len())
	}
	for i, bi := range pl.picks {
		if got, want := pl.table.Backend(i), rs.tableKey(&pl.backends[bi]); got != want {
			t.Fatalf("table index %d is %s, picks says %s", i, got, want)
		}
	}
	for _, sb := range r.Backends {
		b := &rs.backends[rs.find(sb.Addr)]
		if b.addr != sb.Addr || b.pinKey != pins.BackendKey(sb.Addr.String()) {
			t.Fatalf("find(%s) is %s with pin key %x", sb.Addr, b.addr, b.pinKey)
		}
		name := sb.Addr.Addr().String()
		takes := name != "10.0.0.4" && name != "10.0.0.5" // draining, probed down
		if got := pl.byPin(b.pinKey); (got == b) != takes || (got == nil) == takes {
			t.Errorf("byPin(%s) = %v, want taking %v", sb.Addr, got, takes)
		}
		if alive := name != "10.0.0.5"; pl.isAlive(b) != alive {
			t.Errorf("isAlive(%s) = %v, want %v", sb.Addr, !alive, alive)
		}
	}
	if pl.byPin(pins.BackendKey("10.0.0.99:8080")) != nil {
		t.Errorf("byPin found a backend not in the rule")
	}

	// The next configuration drops 10.0.0.1 and moves 10.0.0.2 to another
	// port: sessions on them end, the others continue.
	next := poolRule(20)
	next.Backends[1].Addr = netip.MustParseAddrPort("10.0.0.2:9090")
	next.Backends = next.Backends[1:]
	rs2 := newRuleState(next, m)
	rs2.rebuild(downStatus(), m)
	pl2 := rs2.pool.Load()
	for _, sb := range r.Backends {
		old := &rs.backends[rs.find(sb.Addr)]
		alive := sb.Addr.Addr().String() != "10.0.0.1" && sb.Addr.Addr().String() != "10.0.0.2"
		if pl2.isAlive(old) != alive {
			t.Errorf("after the change, isAlive(%s) = %v, want %v", sb.Addr, !alive, alive)
		}
	}
}

// With every probe down, AllProbedUp serves every non-draining backend, and
// their sessions continue.
func TestPoolAllProbedUp(t *testing.T) {
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	r := poolRule(4, 0)
	r.AllProbedUp = true
	rs := newRuleState(r, m)
	rs.rebuild(downStatus("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"), m)
	pl := rs.pool.Load()
	if pl.healthy != 0 || len(pl.picks) != 3 {
		t.Fatalf("healthy %d, picks %d; want 0, 3", pl.healthy, len(pl.picks))
	}
	for i := range rs.backends {
		b := &rs.backends[i]
		draining := b.addr.Addr().String() == "10.0.0.1"
		if pl.isAlive(b) == draining || (pl.byPin(b.pinKey) != nil) == draining {
			t.Errorf("%s: alive %v, taking %v", b.addr, pl.isAlive(b), pl.byPin(b.pinKey) != nil)
		}
	}
}
