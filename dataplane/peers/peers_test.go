package peers

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/stickylb/stickylb/dataplane/pins"
)

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o600) }

// table is an in-memory Store: every pin it holds counts as an override.
type table struct {
	mu   sync.Mutex
	pins map[string]map[uint64]pins.Pin
}

func newTable() *table { return &table{pins: map[string]map[uint64]pins.Pin{}} }

func (s *table) MergePins(rule string, ps []pins.Pin) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.pins[rule]
	if m == nil {
		m = map[uint64]pins.Pin{}
		s.pins[rule] = m
	}
	for _, p := range ps {
		if old, ok := m[p.Key]; !ok || p.Wins(old) {
			m[p.Key] = p
		}
	}
}

func (s *table) Overrides(fn func(rule string, ps []pins.Pin)) {
	s.mu.Lock()
	snapshot := map[string][]pins.Pin{}
	for rule, m := range s.pins {
		for _, p := range m {
			snapshot[rule] = append(snapshot[rule], p)
		}
	}
	s.mu.Unlock()
	for rule, ps := range snapshot {
		fn(rule, ps)
	}
}

// missing counts the pins of want that the table does not hold as they are.
func (s *table) missing(rule string, want []pins.Pin) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, p := range want {
		if s.pins[rule][p.Key] != p {
			n++
		}
	}
	return n
}

func makePins(n int, seed uint64) []pins.Pin {
	ps := make([]pins.Pin, n)
	now := pins.Now()
	for i := range ps {
		ps[i] = pins.Pin{Key: seed<<32 | uint64(i+1), Backend: pins.BackendKey(fmt.Sprintf("10.0.0.%d:80", i%5)), Gen: 1, Since: now - 60, Seen: now}
	}
	return ps
}

var testKey = bytes.Repeat([]byte{0x42}, KeySize)

// freeAddr returns a loopback address whose port is free for TCP and UDP.
func freeAddr(t *testing.T, ip string) netip.AddrPort {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", ip+":0")
		if err != nil {
			t.Fatal(err)
		}
		a := netip.MustParseAddrPort(l.Addr().String())
		u, err := net.ListenPacket("udp", a.String())
		l.Close()
		if err == nil {
			u.Close()
			return a
		}
	}
	t.Fatalf("no free port on %s", ip)
	return netip.AddrPort{}
}

func staticPeers(addrs ...netip.AddrPort) func(context.Context) ([]string, error) {
	return func(context.Context) ([]string, error) {
		var out []string
		for _, a := range addrs {
			out = append(out, a.String())
		}
		return out, nil
	}
}

// replica is one running Peers with its table.
type replica struct {
	*Peers
	table *table
	stop  func()
}

func start(t *testing.T, cfg Config, tbl *table) *replica {
	t.Helper()
	if cfg.JoinTimeout == 0 {
		cfg.JoinTimeout = 3 * time.Second
	}
	cfg.Log = testLogger(t, cfg.Name)
	p, err := New(cfg, tbl)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Start(ctx) }()
	var once sync.Once
	r := &replica{Peers: p, table: tbl}
	r.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s: Start: %v", cfg.Name, err)
			}
		})
	}
	t.Cleanup(r.stop)
	return r
}

func testLogger(t *testing.T, name string) logr.Logger {
	// memberlist's goroutines may log a moment after Shutdown.
	var over atomic.Bool
	t.Cleanup(func() { over.Store(true) })
	return funcr.New(func(prefix, args string) {
		if testing.Verbose() && !over.Load() {
			t.Logf("%s %s %s", name, prefix, args)
		}
	}, funcr.Options{Verbosity: 1}).WithName(name)
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func received(p *Peers, via string) float64 {
	return testutil.ToFloat64(p.metrics.received.WithLabelValues(via))
}
func dropped(p *Peers, reason string) float64 {
	return testutil.ToFloat64(p.metrics.dropped.WithLabelValues(reason))
}

func lagSamples(p *Peers) uint64 {
	var m dto.Metric
	if err := p.metrics.lag.Write(&m); err != nil {
		panic(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// cluster starts n replicas on 127.0.0.(base+i), each listing all of them
// (itself included), and waits until each sees the others.
func cluster(t *testing.T, n, base int) []*replica {
	t.Helper()
	addrs := make([]netip.AddrPort, n)
	for i := range addrs {
		addrs[i] = freeAddr(t, fmt.Sprintf("127.0.0.%d", base+i))
	}
	rs := make([]*replica, n)
	for i := range rs {
		rs[i] = start(t, Config{Name: fmt.Sprintf("r%d", i), Bind: addrs[i], Key: testKey, Peers: staticPeers(addrs...)}, newTable())
	}
	eventually(t, 10*time.Second, "every replica synced and connected to the others", func() bool {
		for _, r := range rs {
			if !r.Synced() || r.others.Load() != int64(n-1) {
				return false
			}
		}
		return true
	})
	return rs
}

// TestBurstReachesEveryPeer: a burst of announcements after a pool change
// reaches every peer within a second or so: gossip, and a push/pull with
// every member that the burst asks for.
func TestBurstReachesEveryPeer(t *testing.T) {
	rs := cluster(t, 3, 10)
	ps := makePins(500, 1) // about a dozen gossip messages
	rs[0].table.MergePins("default/web", ps)
	rs[0].Announce("default/web", ps)
	for _, r := range rs[1:] {
		eventually(t, 2*time.Second, r.cfg.Name+" holds the announced pins", func() bool { return r.table.missing("default/web", ps) == 0 })
	}
	time.Sleep(time.Second) // gossip's repeats
	for _, r := range rs[1:] {
		// Each message counts once, however often gossip repeats it.
		if got := received(r.Peers, viaGossip); got > 500 {
			t.Errorf("%s: peer_pins_received_total{via=gossip} = %v, more than the 500 announced", r.cfg.Name, got)
		}
		if n := lagSamples(r.Peers); n == 0 || n > 12 {
			t.Errorf("%s: %d sync-lag samples, want one per message received (at most 11)", r.cfg.Name, n)
		}
	}
	if got := testutil.ToFloat64(rs[0].metrics.sent.WithLabelValues(viaGossip)); got != 500 {
		t.Errorf("peer_pins_sent_total{via=gossip} = %v, want 500", got)
	}
	if got := testutil.ToFloat64(rs[0].metrics.peers); got != 2 {
		t.Errorf("stickylb_peers = %v, want 2", got)
	}
	if got := testutil.ToFloat64(rs[0].metrics.enabled); got != 1 {
		t.Errorf("stickylb_peer_sync_enabled = %v, want 1", got)
	}
}

// TestSmallAnnouncementByGossip: an announcement of a few messages reaches
// every peer by gossip alone, without a push/pull.
func TestSmallAnnouncementByGossip(t *testing.T) {
	rs := cluster(t, 3, 80)
	want := map[*replica]float64{}
	for round := range 5 {
		ps := makePins(100, uint64(100+round)) // three messages
		rs[round%3].Announce("default/web", ps)
		for _, r := range rs {
			if r == rs[round%3] {
				continue
			}
			want[r] += 100
			eventually(t, 2*time.Second, r.cfg.Name+" holds the announced pins", func() bool { return r.table.missing("default/web", ps) == 0 })
		}
	}
	for _, r := range rs {
		if got := received(r.Peers, viaState); got != 0 {
			t.Errorf("%s: %v pins received by push/pull; want all by gossip", r.cfg.Name, got)
		}
		if got := received(r.Peers, viaGossip); got != want[r] {
			t.Errorf("%s: %v pins received by gossip, want %v (each once)", r.cfg.Name, got, want[r])
		}
	}
}

// TestJoinerLearnsStateBeforeSynced: a new replica merges the overrides its
// peers hold (push/pull) before it reports itself synced, which readiness
// waits for.
func TestJoinerLearnsStateBeforeSynced(t *testing.T) {
	a := freeAddr(t, "127.0.0.20")
	b := freeAddr(t, "127.0.0.21")
	old := start(t, Config{Name: "old", Bind: a, Key: testKey, Peers: staticPeers(a)}, newTable())
	eventually(t, 5*time.Second, "the first replica synced alone", old.Synced)
	rules := map[string][]pins.Pin{"default/web": makePins(40000, 2), "default/dns": makePins(20000, 3), "other/db": makePins(1, 4)}
	for rule, ps := range rules {
		old.table.MergePins(rule, ps)
	}

	tbl := newTable()
	cfg := Config{Name: "new", Bind: b, Key: testKey, Peers: staticPeers(a, b), Log: testLogger(t, "new")}
	p, err := New(cfg, tbl)
	if err != nil {
		t.Fatal(err)
	}
	if p.Synced() {
		t.Fatal("synced before it started")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Start(ctx) }()
	defer func() { cancel(); <-done }()
	for !p.Synced() {
		time.Sleep(time.Millisecond)
	}
	for rule, ps := range rules {
		if n := tbl.missing(rule, ps); n != 0 {
			t.Errorf("synced, but %d of the %d pins of %s are missing", n, len(ps), rule)
		}
	}
	if got := received(p, viaState); got < 60001 {
		t.Errorf("peer_pins_received_total{via=push_pull} = %v, want at least 60001", got)
	}
}

func TestWrongKeyCannotJoinOrInject(t *testing.T) {
	a := freeAddr(t, "127.0.0.30")
	e := freeAddr(t, "127.0.0.31")
	good := start(t, Config{Name: "good", Bind: a, Key: testKey, Peers: staticPeers(a, e)}, newTable())
	secret := makePins(10, 5)
	good.table.MergePins("default/web", secret)

	evil := start(t, Config{Name: "evil", Bind: e, Key: bytes.Repeat([]byte{0x66}, KeySize), Peers: staticPeers(a, e), JoinTimeout: time.Second}, newTable())
	eventually(t, 5*time.Second, "the replica with another key gives up joining", evil.Synced)
	if n := evil.table.missing("default/web", secret); n != len(secret) {
		t.Errorf("a replica with another key learned %d pins", len(secret)-n)
	}
	if good.others.Load() != 0 || evil.others.Load() != 0 {
		t.Errorf("members: good sees %d, evil sees %d; want none", good.others.Load(), evil.others.Load())
	}

	// Pin messages sent straight to the replica, over UDP and TCP, by
	// memberlists with another key, with none, and (the control) with the key.
	injected := makePins(1, 6)
	send := func(key []byte, ip string, rule string) {
		t.Helper()
		cfg := memberlist.DefaultLANConfig()
		cfg.Name = "sender-" + ip
		cfg.BindAddr, cfg.BindPort = ip, 0
		cfg.SecretKey = key
		cfg.LogOutput = &bytes.Buffer{}
		ml, err := memberlist.Create(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer ml.Shutdown()
		msg := Encode(Message{ID: newID(), Sent: time.Now(), Batches: []Batch{{Rule: rule, Pins: injected}}})
		to := &memberlist.Node{Name: "good", Addr: a.Addr().AsSlice(), Port: a.Port()}
		_ = ml.SendBestEffort(to, msg)
		_ = ml.SendReliable(to, msg)
	}
	send(bytes.Repeat([]byte{0x66}, KeySize), "127.0.0.32", "evil/other-key")
	send(nil, "127.0.0.33", "evil/no-key")
	send(testKey, "127.0.0.34", "control/the-key")
	eventually(t, 5*time.Second, "the key holder's message arrives", func() bool { return good.table.missing("control/the-key", injected) == 0 })
	time.Sleep(200 * time.Millisecond)
	for _, rule := range []string{"evil/other-key", "evil/no-key"} {
		if good.table.missing(rule, injected) == 0 {
			t.Errorf("a message of a sender without the key was merged (%s)", rule)
		}
	}
}

func TestNoKeyNoPeering(t *testing.T) {
	addr := freeAddr(t, "127.0.0.40")
	var logs strings.Builder
	var mu sync.Mutex
	log := funcr.New(func(prefix, args string) { mu.Lock(); logs.WriteString(args + "\n"); mu.Unlock() }, funcr.Options{})
	tbl := newTable()
	p, err := New(Config{Name: "alone", Bind: addr, Peers: staticPeers(addr), Log: log}, tbl)
	if err != nil {
		t.Fatal(err)
	}
	if p.Enabled() || !p.Synced() {
		t.Errorf("without a key: enabled %v, synced %v; want false, true", p.Enabled(), p.Synced())
	}
	if got := testutil.ToFloat64(p.metrics.enabled); got != 0 {
		t.Errorf("stickylb_peer_sync_enabled = %v, want 0", got)
	}
	mu.Lock()
	said := logs.String()
	mu.Unlock()
	if !strings.Contains(said, "no peer key") {
		t.Errorf("the log does not say the replica does not peer: %q", said)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Start(ctx) }()
	p.Announce("default/web", makePins(10, 7))
	time.Sleep(100 * time.Millisecond)
	// Nothing listens on the peer port.
	l, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Errorf("the peer port is taken without a key: %v", err)
	} else {
		l.Close()
	}
	if n := p.queue.NumQueued(); n != 0 {
		t.Errorf("%d messages queued without a key", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Start: %v", err)
	}
}

// TestRestartedMemberGetsState: a replica that restarts (same name and
// address, empty table) rejoins and learns the pins again before it is synced.
func TestRestartedMemberGetsState(t *testing.T) {
	rs := cluster(t, 3, 50)
	ps := makePins(300, 8)
	rs[0].table.MergePins("default/web", ps)
	rs[0].Announce("default/web", ps)
	eventually(t, 5*time.Second, "every replica holds the pins", func() bool {
		return rs[1].table.missing("default/web", ps) == 0 && rs[2].table.missing("default/web", ps) == 0
	})

	rs[2].stop()
	eventually(t, 5*time.Second, "the others see it leave", func() bool { return rs[0].others.Load() == 1 && rs[1].others.Load() == 1 })
	cfg := rs[2].cfg
	cfg.Registerer = nil // a new process
	again := start(t, cfg, newTable())
	eventually(t, 5*time.Second, "the restarted replica synced", again.Synced)
	if n := again.table.missing("default/web", ps); n != 0 {
		t.Errorf("restarted replica synced without %d of the pins", n)
	}
	eventually(t, 10*time.Second, "every replica sees the two others again", func() bool {
		return rs[0].others.Load() == 2 && rs[1].others.Load() == 2 && again.others.Load() == 2
	})
	// And it takes announcements again.
	more := makePins(5, 9)
	rs[1].Announce("default/web", more)
	eventually(t, 5*time.Second, "the restarted replica receives announcements", func() bool { return again.table.missing("default/web", more) == 0 })
}

// TestRejoinAfterPartition: a replica that comes back where its peer cannot
// find it by itself (it lists no peers) is found by the peer's re-join loop,
// and the pins each made meanwhile reach the other. The replica left, or
// vanished without a word (a crash, a network partition).
func TestRejoinAfterPartition(t *testing.T) {
	for i, crash := range []bool{false, true} {
		t.Run(map[bool]string{false: "left", true: "vanished"}[crash], func(t *testing.T) {
			a := freeAddr(t, fmt.Sprintf("127.0.0.%d", 60+2*i))
			b := freeAddr(t, fmt.Sprintf("127.0.0.%d", 61+2*i))
			ra := start(t, Config{Name: "a", Bind: a, Key: testKey, Peers: staticPeers(a, b), RejoinInterval: 300 * time.Millisecond}, newTable())
			rb := start(t, Config{Name: "b", Bind: b, Key: testKey, Peers: staticPeers(a, b)}, newTable())
			eventually(t, 5*time.Second, "a and b connected", func() bool { return ra.others.Load() == 1 && rb.others.Load() == 1 })

			rb.crash = crash
			rb.stop()
			eventually(t, 15*time.Second, "a sees b gone", func() bool { return ra.others.Load() == 0 })
			// Both go on pinning alone.
			fromA := makePins(50, 10)
			ra.table.MergePins("default/web", fromA)
			ra.Announce("default/web", fromA) // nobody to tell: not queued
			if n := ra.queue.NumQueued(); n != 0 {
				t.Errorf("%d messages queued with no peer", n)
			}
			fromB := makePins(50, 11)
			tb := newTable()
			tb.MergePins("default/web", fromB)
			rb2 := start(t, Config{Name: "b", Bind: b, Key: testKey, Peers: staticPeers(b)}, tb)
			eventually(t, 5*time.Second, "b back, alone", rb2.Synced)
			eventually(t, 10*time.Second, "a's re-join loop finds b", func() bool { return ra.others.Load() == 1 && rb2.others.Load() == 1 })
			eventually(t, 5*time.Second, "each holds the other's pins", func() bool {
				return ra.table.missing("default/web", fromB) == 0 && tb.missing("default/web", fromA) == 0
			})
		})
	}
}

// TestBurstIsBoundedAndRepaired: an announcement far beyond what gossip
// carries soon keeps the queue at its cap, counts what it drops, and reaches
// the peer anyway through an early push/pull.
func TestBurstIsBoundedAndRepaired(t *testing.T) {
	rs := cluster(t, 2, 70)
	ps := makePins(100000, 12)
	rs[0].table.MergePins("default/web", ps)
	start := time.Now()
	rs[0].Announce("default/web", ps)
	took := time.Since(start)
	if n := rs[0].queue.NumQueued(); n > maxQueued {
		t.Errorf("%d messages queued, cap %d", n, maxQueued)
	}
	if dropped(rs[0].Peers, dropQueueFull) == 0 {
		t.Error("no drop counted")
	}
	// Correctness, not speed: on a loaded machine merging 100,000 pins
	// after the push/pull took longer than 5 s.
	eventually(t, 30*time.Second, "the peer holds every pin", func() bool { return rs[1].table.missing("default/web", ps) == 0 })
	if received(rs[1].Peers, viaState) == 0 {
		t.Error("the peer got everything without a push/pull, so nothing was dropped?")
	}
	t.Logf("Announce of %d pins took %v", len(ps), took)
}

func TestMemberlistLogLevels(t *testing.T) {
	var lines []string
	log := funcr.New(func(prefix, args string) { lines = append(lines, args) }, funcr.Options{Verbosity: 1})
	w := logWriter{log: log}
	for _, l := range []string{"[ERR] memberlist: boom", "[WARN] memberlist: careful", "[INFO] memberlist: fyi", "[DEBUG] memberlist: noise"} {
		_, _ = w.Write([]byte(l + "\n"))
	}
	got := strings.Join(lines, "\n")
	for _, want := range []string{`"msg"="boom" "severity"="ERR"`, `"msg"="careful" "severity"="WARN"`, `"msg"="fyi"`} {
		if !strings.Contains(got, want) {
			t.Errorf("log lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "noise") {
		t.Errorf("a DEBUG line shows at verbosity 1:\n%s", got)
	}
}
