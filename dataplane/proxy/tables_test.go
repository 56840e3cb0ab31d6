package proxy

import (
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
	"weak"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stickylb/stickylb/dataplane/maglev"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

func mustGet(t *testing.T, c *tableCache, backends ...string) *maglev.Table {
	t.Helper()
	tbl, err := c.get(backends, 0)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func TestTableCacheSharesIdenticalPools(t *testing.T) {
	var c tableCache
	a := mustGet(t, &c, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")
	// Order and duplicates do not make a different pool.
	b := mustGet(t, &c, "10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80")
	if a != b {
		t.Errorf("the same pool got two tables")
	}
	other := mustGet(t, &c, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80")
	if other == a {
		t.Errorf("a different pool got the same table")
	}
	fewer := mustGet(t, &c, "10.0.0.1:80", "10.0.0.2:80")
	if fewer == a || fewer.Len() != 2 {
		t.Errorf("a smaller pool got the same table or a wrong one: %d backends", fewer.Len())
	}
	sized, err := c.get([]string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, 251)
	if err != nil {
		t.Fatal(err)
	}
	if sized == a || sized.Size() != 251 {
		t.Errorf("an explicit size got the automatic table (size %d)", sized.Size())
	}
	// The shared table is the one Build makes for the pool.
	want, _ := maglev.Build([]string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, 0)
	for h := range uint64(1000) {
		if a.Lookup(h*0x9e3779b97f4a7c15) != want.Lookup(h*0x9e3779b97f4a7c15) {
			t.Fatalf("shared table differs from Build's")
		}
	}
	tables, slots, bytes := c.stats()
	wantSlots := int64(a.Size() + other.Size() + fewer.Size() + sized.Size())
	if tables != 4 || slots != wantSlots || bytes != wantSlots {
		t.Errorf("stats = %d tables, %d slots, %d bytes; want 4, %d, %d", tables, slots, bytes, wantSlots, wantSlots)
	}
	runtime.KeepAlive([]*maglev.Table{a, other, fewer, sized})
}

// waitReleased collects garbage until the cache holds no table.
func waitReleased(t *testing.T, c *tableCache) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		if tables, slots, bytes := c.stats(); tables == 0 && slots == 0 && bytes == 0 {
			c.mu.Lock()
			n := len(c.entries)
			c.mu.Unlock()
			if n != 0 {
				t.Fatalf("stats are zero but %d entries remain", n)
			}
			return
		}
		if time.Now().After(deadline) {
			tables, slots, bytes := c.stats()
			t.Fatalf("unused tables not released: %d tables, %d slots, %d bytes", tables, slots, bytes)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTableCacheReleasesUnusedTables(t *testing.T) {
	var c tableCache
	tbl := mustGet(t, &c, "10.0.0.1:80", "10.0.0.2:80")
	wp := weak.Make(tbl)
	if tables, _, _ := c.stats(); tables != 1 {
		t.Fatalf("%d tables after one get", tables)
	}
	tbl = nil
	waitReleased(t, &c)
	if wp.Value() != nil {
		t.Errorf("the table outlived its last user")
	}
	// The same pool again builds a new table, and counts it.
	again := mustGet(t, &c, "10.0.0.1:80", "10.0.0.2:80")
	if tables, slots, _ := c.stats(); tables != 1 || slots != int64(again.Size()) {
		t.Errorf("after rebuilding: %d tables, %d slots", tables, slots)
	}
	runtime.KeepAlive(again)
	again = nil
	waitReleased(t, &c)
}

func TestTableCacheConcurrent(t *testing.T) {
	var c tableCache
	pools := make([][]string, 8)
	for i := range pools {
		for j := range 20 + i%2 {
			pools[i] = append(pools[i], fmt.Sprintf("10.0.%d.%d:80", i%4, j))
		}
	}
	// Pools i and i+4 are the same backends, so there are 4 distinct pools;
	// every goroutine asks for all 8, starting at a different one.
	got := make([][]*maglev.Table, 16)
	var wg sync.WaitGroup
	for g := range got {
		wg.Go(func() {
			for i := range pools {
				p := pools[(i+g)%len(pools)]
				tbl, err := c.get(p, 0)
				if err != nil {
					t.Error(err)
					return
				}
				got[g] = append(got[g], tbl)
			}
		})
	}
	wg.Wait()
	byPool := map[string]*maglev.Table{}
	for g := range got {
		for i, tbl := range got[g] {
			key := fmt.Sprint(pools[(i+g)%len(pools)])
			if prev, ok := byPool[key]; ok && prev != tbl {
				t.Fatalf("pool %s got two tables", key)
			}
			byPool[key] = tbl
		}
	}
	if tables, _, _ := c.stats(); tables != int64(len(byPool)) {
		t.Errorf("%d tables cached for %d distinct pools", tables, len(byPool))
	}
	runtime.KeepAlive(got)
}

// TestRulesShareTables checks the proxy: rules with the same endpoints
// serve from one table, a rule whose pool changes gets another, and the
// gauges count each table once.
func TestRulesShareTables(t *testing.T) {
	p := newProxy(t, Options{})
	backends := startBackends(t, 3, 0)
	r1 := rule("one", freePort(t), backends)
	r2 := rule("two", freePort(t), backends)
	r3 := rule("three", freePort(t), backends[:2])
	p.apply(t, r1, r2, r3)
	table := func(name string) *maglev.Table {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.rules["default/"+name].pool.Load().table
	}
	if table("one") != table("two") {
		t.Errorf("rules with the same endpoints hold different tables")
	}
	if table("three") == table("one") {
		t.Errorf("a rule with a different pool holds the same table")
	}
	before := table("two")
	r2.Backends = r2.Backends[:2]
	p.apply(t, r1, r2, r3)
	if table("two") == before || table("two") != table("three") {
		t.Errorf("after its pool changed, rule two holds the wrong table")
	}
	if table("one") != before {
		t.Errorf("rule one's table changed with rule two's pool")
	}
	// The gauges count shared tables once: at least these two tables are
	// alive (other tests' proxies may hold more).
	if n := gaugeValue(t, p.reg, "stickylb_maglev_tables"); n < 2 {
		t.Errorf("stickylb_maglev_tables = %v, want at least 2", n)
	}
	if n := gaugeValue(t, p.reg, "stickylb_maglev_table_slots"); n < float64(table("one").Size()+table("three").Size()) {
		t.Errorf("stickylb_maglev_table_slots = %v, below the two live tables' slots", n)
	}
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

// The collector exports what the cache holds.
func TestTableCollector(t *testing.T) {
	var c tableCache
	a := mustGet(t, &c, "10.0.0.1:80")
	b := mustGet(t, &c, make([]string, 0)...)
	col := newTableCollector(&c)
	if n := testutil.CollectAndCount(col); n != 3 {
		t.Errorf("%d series, want 3", n)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(col)
	if got := gaugeValue(t, reg, "stickylb_maglev_tables"); got != 2 {
		t.Errorf("tables = %v, want 2 (an empty pool's table counts, with no slots)", got)
	}
	if got := gaugeValue(t, reg, "stickylb_maglev_table_slots"); got != float64(a.Size()) {
		t.Errorf("slots = %v, want %d", got, a.Size())
	}
	if got := gaugeValue(t, reg, "stickylb_maglev_table_bytes"); got != float64(a.Bytes()+b.Bytes()) {
		t.Errorf("bytes = %v, want %d", got, a.Bytes()+b.Bytes())
	}
	runtime.KeepAlive([]*maglev.Table{a, b})
}

// Rules over the same pods on different ports (a Service's TCP and UDP
// rules, several ports of one app) key their tables by IP: they share one
// table, and a client of their frontend gets the same pod on each.
func TestRulesOverTheSamePodsShareATable(t *testing.T) {
	p := newProxy(t, Options{})
	onPort := func(port uint16) []*backendServer {
		var bs []*backendServer
		for i := range 5 {
			ip := netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)})
			bs = append(bs, &backendServer{Name: ip.String(), Addr: netip.AddrPortFrom(ip, port)})
		}
		return bs
	}
	web := rule("web", freePort(t), onPort(8080))
	dns := rule("dns", freePort(t), onPort(53), protocols(snapshot.UDP))
	// Two backends at one IP: keyed by ip:port, so both stay in the table.
	two := rule("two", freePort(t), append(onPort(8080)[:1], onPort(8081)[:1]...))
	p.apply(t, web, dns, two)
	pool := func(name string) *pool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.rules["default/"+name].pool.Load()
	}
	if pool("web").table != pool("dns").table {
		t.Errorf("rules over the same pods on different ports hold different tables")
	}
	if tbl := pool("two").table; tbl.Len() != 2 || tbl.Backend(0) != "127.0.1.1:8080" || tbl.Backend(1) != "127.0.1.1:8081" {
		t.Errorf("a rule with two backends at one IP: table of %d backends, first %q", tbl.Len(), tbl.Backend(0))
	}
	for i := range 200 {
		client := clientIP(i)
		a, err := p.Where("default/web", client, snapshot.TCP)
		if err != nil {
			t.Fatal(err)
		}
		b, err := p.Where("default/dns", client, snapshot.UDP)
		if err != nil {
			t.Fatal(err)
		}
		pa, pb := netip.MustParseAddrPort(a.Backends[0]), netip.MustParseAddrPort(b.Backends[0])
		if pa.Addr() != pb.Addr() || pa.Port() != 8080 || pb.Port() != 53 {
			t.Fatalf("client %s: %s on web, %s on dns; want one pod", client, pa, pb)
		}
	}
}

func TestSharesIP(t *testing.T) {
	be := func(addrs ...string) []snapshot.Backend {
		var bs []snapshot.Backend
		for _, a := range addrs {
			bs = append(bs, snapshot.Backend{Addr: netip.MustParseAddrPort(a)})
		}
		return bs
	}
	for _, tc := range []struct {
		bs   []snapshot.Backend
		want bool
	}{
		{be(), false},
		{be("10.0.0.1:80", "10.0.0.2:80"), false},
		{be("10.0.0.1:80", "10.0.0.1:81"), true},
		{be("10.0.0.2:80", "10.0.0.1:80"), false},                // not sorted
		{be("10.0.0.1:81", "10.0.0.2:80", "10.0.0.1:80"), true},  // not sorted
		{be("10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80"), false}, // a duplicate is one backend
		{be("10.0.0.1:80", "[fd00::1]:80", "[fd00::1]:81"), true},
	} {
		if got := sharesIP(tc.bs); got != tc.want {
			t.Errorf("sharesIP(%v) = %v, want %v", tc.bs, got, tc.want)
		}
	}
}

// A rule that pins (or hashes each connection) gets the compact table; a
// rule whose clients follow the table alone (pin timeout 0) the automatic,
// larger one.
func TestTableSizeFollowsPinning(t *testing.T) {
	pinned := &snapshot.Rule{Persistence: snapshot.PersistenceClientIP, PinTimeout: time.Hour}
	tableOnly := &snapshot.Rule{Persistence: snapshot.PersistenceClientIP}
	none := &snapshot.Rule{Persistence: snapshot.PersistenceNone}
	compact, _ := maglev.CompactSize(100)
	if got := tableSize(pinned, 100); got != compact {
		t.Errorf("pinned rule: size %d, want %d", got, compact)
	}
	if got := tableSize(none, 100); got != compact {
		t.Errorf("None rule: size %d, want %d", got, compact)
	}
	if got := tableSize(tableOnly, 100); got != 0 {
		t.Errorf("rule without pins: size %d, want the automatic size (0)", got)
	}
	tbl, err := sharedTables.get(backendKeysFor(100), tableSize(tableOnly, 100))
	if err != nil || tbl.Size() <= compact {
		t.Errorf("rule without pins: table of %v slots (%v), want more than %d", tbl.Size(), err, compact)
	}
}

func backendKeysFor(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.2.%d.%d", i/250, i%250+1)
	}
	return out
}
