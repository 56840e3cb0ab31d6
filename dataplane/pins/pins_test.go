package pins

import (
	"math/rand/v2"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

func limits(maxPins int64, perSource int32) *Limits {
	return &Limits{MaxPins: maxPins, MaxPerSource: perSource}
}

var (
	backendA = BackendKey("10.0.0.1:80")
	backendB = BackendKey("10.0.0.2:80")
	backendC = BackendKey("10.0.0.3:80")
)

func all(uint64) bool { return true }

func TestPinLookupAndExpiry(t *testing.T) {
	tb := New(10*time.Second, limits(100, 100))
	const now = 1_000_000
	if _, ok := tb.Lookup(42, now); ok {
		t.Fatal("empty table has a pin")
	}
	if _, r := tb.Pin(42, backendA, 7, now); r != Created {
		t.Fatalf("Pin = %v, want Created", r)
	}
	if b, ok := tb.Lookup(42, now+10); !ok || b != backendA {
		t.Fatalf("Lookup at the timeout = %x %v, want A", b, ok)
	}
	// That lookup was a flow: the pin lasts another 10 s from now+10.
	if _, ok := tb.Lookup(42, now+20); !ok {
		t.Fatal("a flow did not extend the pin")
	}
	if _, ok := tb.Lookup(42, now+31); ok {
		t.Fatal("pin outlived its timeout")
	}
	// Get does not extend it.
	tb.Pin(43, backendB, 7, now)
	if _, ok := tb.Get(43, now+5); !ok {
		t.Fatal("Get missed a live pin")
	}
	if _, ok := tb.Lookup(43, now+11); ok {
		t.Fatal("Get extended the pin")
	}
	// The sweep drops both and releases the replica's count.
	tb.Reconcile(now+100, 0, func(uint64) uint64 { return 0 }, all)
	if s := tb.Stats(); s.Held != 0 || s.Expired != 2 || s.Created != 2 {
		t.Fatalf("stats after sweep = %+v", s)
	}
	if tb.lim.Held() != 0 {
		t.Fatalf("replica count = %d, want 0", tb.lim.Held())
	}
}

func TestRepinBumpsGeneration(t *testing.T) {
	tb := New(time.Minute, limits(100, 100))
	p, _ := tb.Pin(1, backendA, 1, 100)
	q, r := tb.Pin(1, backendB, 1, 130)
	if r != Repinned || q.Gen != p.Gen+1 || q.Since != 130 || !q.Wins(p) {
		t.Fatalf("re-pin = %+v %v", q, r)
	}
	if k, r := tb.Pin(1, backendB, 1, 140); r != Kept || k.Since != 130 {
		t.Fatalf("same backend = %+v %v, want Kept since 200", k, r)
	}
	if s := tb.Stats(); s.Held != 1 || s.Created != 1 {
		t.Fatalf("stats = %+v", s)
	}
}

func TestReservedKeys(t *testing.T) {
	tb := New(time.Minute, limits(100, 100))
	for k := range uint64(keyFix) {
		tb.Pin(k, backendA, 0, 100)
		if b, ok := tb.Lookup(k, 100); !ok || b != backendA {
			t.Fatalf("key %d not found", k)
		}
	}
}

// A flood of new clients cannot evict active pins: beyond the cap new
// clients get no pin, and the active ones keep theirs.
func TestCapNeverEvictsActivePins(t *testing.T) {
	lim := limits(1000, 1<<30)
	tb := New(time.Hour, lim)
	for k := range uint64(1000) {
		if _, r := tb.Pin(k*7919+5, backendA, 0, 100); r != Created {
			t.Fatalf("pin %d: %v", k, r)
		}
	}
	other := New(time.Hour, lim) // the cap is per replica, across rules
	for k := range uint64(5000) {
		if _, r := tb.Pin(1<<40+k, backendB, 0, 101); r != RefusedFull {
			t.Fatalf("flood pin %d: %v, want RefusedFull", k, r)
		}
		if _, r := other.Pin(k, backendB, 0, 101); r != RefusedFull {
			t.Fatalf("other rule: %v, want RefusedFull", r)
		}
	}
	for k := range uint64(1000) {
		if b, ok := tb.Lookup(k*7919+5, 102); !ok || b != backendA {
			t.Fatalf("active pin %d lost", k)
		}
	}
	// Once pins expire, their room is free again.
	tb.Reconcile(102+3601, 0, func(uint64) uint64 { return 0 }, all)
	if _, r := other.Pin(1, backendB, 0, 3704); r != Created {
		t.Fatalf("after expiry: %v", r)
	}
}

func TestPerSourceCap(t *testing.T) {
	const perSource = 256
	tb := New(time.Hour, limits(1<<20, perSource))
	flood := SourceOf(netip.MustParseAddr("2001:db8::1"))
	created := 0
	for k := range uint64(10 * perSource) {
		if _, r := tb.Pin(rand.Uint64()|k, backendA, flood, 100); r == Created {
			created++
		} else if r != RefusedSource {
			t.Fatalf("flood: %v", r)
		}
	}
	if created > perSource || created < perSource/2 {
		t.Fatalf("one source got %d pins, cap %d", created, perSource)
	}
	// Another source is not affected.
	other := SourceOf(netip.MustParseAddr("192.0.2.9"))
	for k := range uint64(100) {
		if _, r := tb.Pin(1<<50+k, backendA, other, 100); r != Created {
			t.Fatalf("other source: %v", r)
		}
	}
	// Peer pins carry no source and are not capped by it.
	for k := range uint64(100) {
		if _, took := tb.Merge(Pin{Key: 1<<52 + k, Backend: backendA, Since: 100, Seen: 100}, 100, all); !took {
			t.Fatal("peer pin refused")
		}
	}
}

func TestSourceOf(t *testing.T) {
	a := SourceOf(netip.MustParseAddr("10.1.2.3"))
	if a != SourceOf(netip.MustParseAddr("10.1.2.250")) || a == SourceOf(netip.MustParseAddr("10.1.3.3")) {
		t.Fatal("IPv4 source is not the /24")
	}
	if a != SourceOf(netip.MustParseAddr("::ffff:10.1.2.9")) {
		t.Fatal("a v4-mapped address is another source")
	}
	b := SourceOf(netip.MustParseAddr("2001:db8:1:2::1"))
	if b != SourceOf(netip.MustParseAddr("2001:db8:1:2:ffff::9")) || b == SourceOf(netip.MustParseAddr("2001:db8:1:3::1")) {
		t.Fatal("IPv6 source is not the /64")
	}
	if a == 0 || b == 0 {
		t.Fatal("a client source is 0")
	}
}

func TestMergeOrder(t *testing.T) {
	const now = 10_000
	alive := func(b uint64) bool { return b != backendC }
	cases := []struct {
		name  string
		ours  *Pin
		peer  Pin
		took  bool
		final uint64
	}{
		{"new client", nil, Pin{Backend: backendA, Since: 10, Seen: now}, true, backendA},
		{"older pin wins", &Pin{Backend: backendB, Since: 50, Seen: now}, Pin{Backend: backendA, Since: 10, Seen: now}, true, backendA},
		{"newer pin loses", &Pin{Backend: backendB, Since: 5, Seen: now}, Pin{Backend: backendA, Since: 10, Seen: now}, false, backendB},
		{"higher generation wins", &Pin{Backend: backendB, Since: 5, Seen: now}, Pin{Backend: backendA, Gen: 1, Since: 90, Seen: now}, true, backendA},
		{"our backend gone", &Pin{Backend: backendC, Gen: 3, Since: 5, Seen: now}, Pin{Backend: backendA, Since: 90, Seen: now}, true, backendA},
		{"our pin expired", &Pin{Backend: backendB, Gen: 3, Since: 5, Seen: now - 100}, Pin{Backend: backendA, Since: 90, Seen: now}, true, backendA},
		{"peer pin expired", nil, Pin{Backend: backendA, Since: 10, Seen: now - 100}, false, 0},
		{"same backend keeps the latest flow", &Pin{Backend: backendA, Since: 20, Seen: now - 30}, Pin{Backend: backendA, Since: 10, Seen: now - 5}, true, backendA},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tb := New(60*time.Second, limits(10, 10))
			if c.ours != nil {
				p := *c.ours
				p.Key = 9
				tb.Merge(p, p.Seen, all)
			}
			peer := c.peer
			peer.Key = 9
			_, took := tb.Merge(peer, now, alive)
			if took != c.took {
				t.Fatalf("took = %v, want %v", took, c.took)
			}
			got, ok := tb.Get(9, now)
			if c.final == 0 {
				if ok {
					t.Fatalf("pin %+v stored", got)
				}
				return
			}
			if !ok || got.Backend != c.final {
				t.Fatalf("stored %+v (%v), want backend %x", got, ok, c.final)
			}
			if c.name == "same backend keeps the latest flow" && (got.Seen != now-5 || got.Since != 10) {
				t.Fatalf("merged = %+v", got)
			}
		})
	}
}

// Merging in any order converges: every replica ends with the pin that Wins.
func TestMergeConverges(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		var ps []Pin
		for range 1 + r.IntN(5) {
			ps = append(ps, Pin{Key: 77, Backend: []uint64{backendA, backendB}[r.IntN(2)], Gen: uint32(r.IntN(3)), Since: uint32(100 + r.IntN(4)), Seen: 200})
		}
		// Every replica ends with the greatest pin in the Wins order.
		want := ps[0]
		for _, p := range ps[1:] {
			if p.Wins(want) {
				want = p
			}
		}
		for range 3 {
			tb := New(time.Hour, limits(10, 10))
			for _, i := range r.Perm(len(ps)) {
				tb.Merge(ps[i], 200, all)
			}
			if got, _ := tb.Get(77, 200); got.Backend != want.Backend || got.Gen != want.Gen || got.Since != want.Since {
				t.Fatalf("merging %+v gave %x, want %x", ps, got.Backend, want.Backend)
			}
		}
	}
}

func TestReconcileAnnouncesOverridesOnce(t *testing.T) {
	tb := New(time.Hour, limits(1000, 1000))
	const now = 5000
	for k := range uint64(100) {
		tb.Pin(k+10, backendA, 0, now)
	}
	pick := func(k uint64) uint64 {
		if k%5 == 0 { // the table moved one client in five
			return backendB
		}
		return backendA
	}
	if a := tb.Reconcile(now, 0, pick, all); len(a) != 20 {
		t.Fatalf("announced %d, want 20", len(a))
	}
	if s := tb.Stats(); s.Overriding != 20 {
		t.Fatalf("overriding = %d", s.Overriding)
	}
	if a := tb.Reconcile(now+1, 0, pick, all); len(a) != 0 {
		t.Fatalf("announced again: %d", len(a))
	}
	if got := len(tb.Overrides(now+1, pick, all)); got != 20 {
		t.Fatalf("Overrides = %d, want 20", got)
	}
	// The refresh re-announces overrides whose clients had a flow since.
	tb.Lookup(15, now+60)
	if a := tb.Reconcile(now+61, now+30, pick, all); len(a) != 1 || a[0].Key != 15 {
		t.Fatalf("refresh announced %+v", a)
	}
	// Overrides whose backend is gone are neither counted nor announced.
	if a := tb.Reconcile(now+62, 0, pick, func(b uint64) bool { return b != backendA }); len(a) != 0 || tb.Stats().Overriding != 0 {
		t.Fatalf("gone backend announced: %d", len(a))
	}
	// A pin that agrees with the table again stops overriding, and is
	// announced again if it overrides later.
	tb.Reconcile(now+63, 0, func(uint64) uint64 { return backendA }, all)
	if a := tb.Reconcile(now+64, 0, pick, all); len(a) != 20 {
		t.Fatalf("announced %d after agreeing, want 20", len(a))
	}
	// Pins from peers are known to the network: never announced.
	tb2 := New(time.Hour, limits(1000, 1000))
	tb2.Merge(Pin{Key: 10, Backend: backendA, Since: now, Seen: now}, now, all)
	if a := tb2.Reconcile(now, 0, pick, all); len(a) != 0 || tb2.Stats().Overriding != 1 {
		t.Fatalf("peer pin announced: %+v", a)
	}
}

func TestGrowKeepsPins(t *testing.T) {
	tb := New(time.Hour, limits(1<<20, 1<<20))
	const n = 50_000
	for k := range uint64(n) {
		tb.Pin(k*0x9e3779b97f4a7c15, BackendKey(string(rune('a'+k%7))), 0, 1)
	}
	for k := range uint64(n) {
		if b, ok := tb.Lookup(k*0x9e3779b97f4a7c15, 2); !ok || b != BackendKey(string(rune('a'+k%7))) {
			t.Fatalf("pin %d lost after growth", k)
		}
	}
	// Expire and re-create many times: tombstones do not grow the table.
	tb.Reconcile(1+3601, 0, func(uint64) uint64 { return 0 }, all)
	for round := range uint32(5) {
		now := 10_000 + round*4000
		for k := range uint64(n) {
			tb.Pin(k+uint64(round)<<40, backendA, 0, now)
		}
		tb.Reconcile(now+3601, 0, func(uint64) uint64 { return 0 }, all)
	}
	for i := range tb.shards {
		if p := tb.shards[i].slots.Load(); p != nil && len(*p) > 4*n/nShards*2 {
			t.Fatalf("shard %d holds %d slots for at most %d pins", i, len(*p), n/nShards)
		}
	}
}

// Readers run concurrently with writers that pin, re-pin, merge and sweep;
// run with -race.
func TestConcurrentUse(t *testing.T) {
	tb := New(time.Hour, limits(1<<20, 1<<20))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	backends := []uint64{backendA, backendB, backendC}
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := r.Uint64N(5000)
				switch i % 4 {
				case 0, 1:
					tb.Pin(k, backends[r.IntN(3)], Source(k%50+1), 100)
				case 2:
					tb.Merge(Pin{Key: k, Backend: backends[r.IntN(3)], Gen: uint32(r.IntN(3)), Since: 90, Seen: 100}, 100, all)
				case 3:
					if i%400 == 3 {
						tb.Reconcile(100, 0, func(k uint64) uint64 { return backends[k%3] }, all)
					}
				}
			}
		})
	}
	for range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if b, ok := tb.Lookup(uint64(i%5000), 100); ok && b != backendA && b != backendB && b != backendC {
					t.Errorf("torn read: backend %x", b)
					return
				}
			}
		})
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	held := tb.Stats().Held
	if int64(held) != tb.lim.Held() || held > 5000 {
		t.Fatalf("held %d, replica count %d", held, tb.lim.Held())
	}
}

func TestLookupDoesNotAllocate(t *testing.T) {
	tb := New(time.Hour, limits(100, 100))
	tb.Pin(5, backendA, 1, 100)
	if n := testing.AllocsPerRun(100, func() { tb.Lookup(5, 100); tb.Lookup(6, 100) }); n != 0 {
		t.Fatalf("Lookup allocates %v times", n)
	}
}

// BenchmarkPinMemory reports the heap each pin costs in a table of a
// million clients from 4,000 sources.
func BenchmarkPinMemory(b *testing.B) {
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		tb := New(time.Hour, limits(1<<30, 1<<30))
		const n = 1_000_000
		for k := range uint64(n) {
			tb.Pin(k*0x9e3779b97f4a7c15+1, backendA, Source(k%4000+1), 100)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/pin")
		runtime.KeepAlive(tb)
	}
}

func BenchmarkLookup(b *testing.B) {
	tb := New(time.Hour, limits(1<<30, 1<<30))
	for k := range uint64(100_000) {
		tb.Pin(k*0x9e3779b97f4a7c15+1, backendA, 0, 100)
	}
	b.RunParallel(func(pb *testing.PB) {
		k := uint64(0)
		for pb.Next() {
			tb.Lookup((k%100_000)*0x9e3779b97f4a7c15+1, 100)
			k++
		}
	})
}

func TestCountByBackend(t *testing.T) {
	tb := New(10*time.Second, limits(10_000, 10_000))
	const now = 1_000_000
	for k := uint64(1); k <= 300; k++ {
		b := backendA
		switch {
		case k%3 == 1:
			b = backendB
		case k%3 == 2 && k > 150:
			b = backendC
		}
		// Some pins are old: they expire before the count.
		when := uint32(now)
		if k%10 == 0 {
			when = now - 60
		}
		tb.Pin(k<<8, b, Source(k), when) // clear of the reserved keys
	}
	got := tb.CountByBackend(now)
	// Every tenth pin expired.
	want := map[uint64]int{}
	for k := uint64(1); k <= 300; k++ {
		if k%10 == 0 {
			continue
		}
		switch {
		case k%3 == 1:
			want[backendB]++
		case k%3 == 2 && k > 150:
			want[backendC]++
		default:
			want[backendA]++
		}
	}
	if len(got) != len(want) {
		t.Fatalf("CountByBackend = %v, want %v", got, want)
	}
	for b, n := range want {
		if got[b] != n {
			t.Fatalf("backend %x: %d pins, want %d (all %v)", b, got[b], n, got)
		}
	}
}
