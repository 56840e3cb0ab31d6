package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// The UDP path reads client datagrams and backend replies in batches of up
// to udpBatch. These tests send from many client addresses (127.0.2.x and
// up) through real sockets, in bursts that fill batches, split them, or
// mix clients within one.

// udpEcho is a backend that answers each datagram with its name, '|', and
// the datagram, from a buffer large enough for any datagram.
type udpEcho struct {
	name string
	addr netip.AddrPort
	mu   sync.Mutex
	conn *net.UDPConn
}

func startUDPEchoes(t *testing.T, n int, port uint16) []*udpEcho {
	t.Helper()
	var out []*udpEcho
	for i := range n {
		e := &udpEcho{name: fmt.Sprintf("b%d", i+1), addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}), port)}
		e.start(t)
		t.Cleanup(e.stop)
		out = append(out, e)
	}
	return out
}

func (e *udpEcho) start(t *testing.T) {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(e.addr))
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadBuffer(4 << 20)
	e.mu.Lock()
	e.conn = c
	e.mu.Unlock()
	go func() {
		buf := make([]byte, 64<<10)
		prefix := []byte(e.name + "|")
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf[len(prefix):])
			if err != nil {
				return
			}
			copy(buf, prefix)
			_, _ = c.WriteToUDPAddrPort(buf[:len(prefix)+n], from)
		}
	}()
}

// stop closes the backend's socket: datagrams to it now draw ICMP port
// unreachable.
func (e *udpEcho) stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.conn != nil {
		_ = e.conn.Close()
		e.conn = nil
	}
}

func udpRule(name string, port uint16, backends []*udpEcho, opts ...ruleOpt) snapshot.Rule {
	r := rule(name, port, nil, protocols(snapshot.UDP))
	for _, b := range backends {
		r.Backends = append(r.Backends, snapshot.Backend{Addr: b.addr})
	}
	for _, o := range opts {
		o(&r)
	}
	return r
}

// udpBurst sends msgs back to back on c, then reads len(msgs) replies (or
// until timeout) and returns them split into backend name and payload.
func udpBurst(t *testing.T, c *net.UDPConn, msgs [][]byte, timeout time.Duration) (names []string, payloads [][]byte) {
	t.Helper()
	for _, m := range msgs {
		if _, err := c.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	return udpReplies(c, len(msgs), timeout)
}

func udpReplies(c *net.UDPConn, n int, timeout time.Duration) (names []string, payloads [][]byte) {
	buf := make([]byte, 64<<10)
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	for range n {
		k, err := c.Read(buf)
		if err != nil {
			break
		}
		name, payload, _ := bytes.Cut(buf[:k], []byte("|"))
		names = append(names, string(name))
		payloads = append(payloads, bytes.Clone(payload))
	}
	return names, payloads
}

func numbered(n, size int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		m := bytes.Repeat([]byte{'x'}, size)
		copy(m, fmt.Sprintf("%04d", i))
		out[i] = m
	}
	return out
}

// sameSet reports whether got holds exactly want's datagrams, in any order.
func sameSet(got, want [][]byte) error {
	if len(got) != len(want) {
		return fmt.Errorf("%d datagrams, want %d", len(got), len(want))
	}
	seen := map[string]int{}
	for _, w := range want {
		seen[string(w)]++
	}
	for _, g := range got {
		if seen[string(g)] == 0 {
			return fmt.Errorf("unexpected or repeated datagram of %d bytes starting %q", len(g), g[:min(len(g), 8)])
		}
		seen[string(g)]--
	}
	return nil
}

func oneBackend(names []string) (string, error) {
	if len(names) == 0 {
		return "", errors.New("no reply")
	}
	for _, n := range names {
		if n != names[0] {
			return "", fmt.Errorf("replies from %q and %q", names[0], n)
		}
	}
	return names[0], nil
}

func TestUDPBatches(t *testing.T) {
	backends := startUDPEchoes(t, 3, 9031)
	for _, gso := range []bool{true, false} {
		t.Run(fmt.Sprintf("gso=%v", gso), func(t *testing.T) {
			// Restored after the proxy's cleanup has stopped its loops.
			t.Cleanup(func() { udpGSO.Store(true) })
			udpGSO.Store(gso)
			testUDPBatches(t, backends)
		})
	}
}

func testUDPBatches(t *testing.T, backends []*udpEcho) {
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, udpRule("batch", port, backends))

	t.Run("a partial batch", func(t *testing.T) {
		c := udpClient(t, clientIP(1), port)
		msgs := numbered(3, 64)
		names, got := udpBurst(t, c, msgs, 2*time.Second)
		if err := sameSet(got, msgs); err != nil {
			t.Fatal(err)
		}
		if _, err := oneBackend(names); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("more than a batch from one client", func(t *testing.T) {
		c := udpClient(t, clientIP(2), port)
		_ = c.SetReadBuffer(4 << 20)
		msgs := numbered(3*udpBatch+5, 100)
		names, got := udpBurst(t, c, msgs, 2*time.Second)
		if err := sameSet(got, msgs); err != nil {
			t.Fatal(err)
		}
		if _, err := oneBackend(names); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("runs of sizes, shorter ones and empty ones", func(t *testing.T) {
		c := udpClient(t, clientIP(4), port)
		_ = c.SetReadBuffer(4 << 20)
		var msgs [][]byte
		for i, size := range []int{300, 300, 300, 120, 0, 0, 300, 500, 500, 0, 64, 64, 64, 64, 63, 64, 1, 1} {
			m := bytes.Repeat([]byte{byte('a' + i)}, size)
			msgs = append(msgs, m)
		}
		names, got := udpBurst(t, c, msgs, 2*time.Second)
		if err := sameSet(got, msgs); err != nil {
			t.Fatal(err)
		}
		if _, err := oneBackend(names); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the largest datagram among small ones", func(t *testing.T) {
		c := udpClient(t, clientIP(3), port)
		_ = c.SetReadBuffer(4 << 20)
		_ = c.SetWriteBuffer(4 << 20)
		// The reply adds "bN|": the request leaves it room under 65,507.
		large := bytes.Repeat([]byte("0123456789abcdef"), 4096)[:65507-3]
		large[len(large)-1] = '!'
		msgs := [][]byte{[]byte("small-1"), large, []byte("small-2"), append([]byte(nil), large[:40000]...)}
		names, got := udpBurst(t, c, msgs, 2*time.Second)
		if err := sameSet(got, msgs); err != nil {
			t.Fatal(err)
		}
		if _, err := oneBackend(names); err != nil {
			t.Fatal(err)
		}
		m := p.metrics
		b := msgs[1]
		if in := p.counter(m.bytes.WithLabelValues("default/batch", "127.0.1."+names[0][1:]+":9031", "in")); in < float64(len(b)) {
			t.Errorf("byte_count{in} = %v, less than the large datagram", in)
		}
	})

	t.Run("many clients interleaved, each on its own backend", func(t *testing.T) {
		const clients, each = 60, 4
		conns := make([]*net.UDPConn, clients)
		pinned := make([]string, clients)
		for i := range conns {
			conns[i] = udpClient(t, clientIP(10+i), port)
			_ = conns[i].SetReadBuffer(1 << 20)
			names, _ := udpBurst(t, conns[i], [][]byte{[]byte("hello")}, 2*time.Second)
			var err error
			if pinned[i], err = oneBackend(names); err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
		}
		// Round-robin over the clients: each batch the proxy reads mixes them.
		for k := range each {
			for i, c := range conns {
				if _, err := c.Write(fmt.Appendf(nil, "c%d-%d", i, k)); err != nil {
					t.Fatal(err)
				}
			}
		}
		used := map[string]bool{}
		for i, c := range conns {
			names, got := udpReplies(c, each, 2*time.Second)
			var want [][]byte
			for k := range each {
				want = append(want, fmt.Appendf(nil, "c%d-%d", i, k))
			}
			if err := sameSet(got, want); err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
			if b, err := oneBackend(names); err != nil || b != pinned[i] {
				t.Fatalf("client %d: answered by %v (%v), pinned to %s", i, names, err, pinned[i])
			}
			used[pinned[i]] = true
		}
		if len(used) < 2 {
			t.Errorf("%d clients all on %v", clients, used)
		}
	})
}

func TestUDPBackendStopsMidBatch(t *testing.T) {
	backends := startUDPEchoes(t, 3, 9032)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, udpRule("stop", port, backends))

	// Clients until some sit on b1 and some elsewhere.
	var onVictim, others []*net.UDPConn
	for i := 0; i < 200 && (len(onVictim) < 4 || len(others) < 8); i++ {
		c := udpClient(t, clientIP(100+i), port)
		names, _ := udpBurst(t, c, [][]byte{[]byte("hello")}, 2*time.Second)
		b, err := oneBackend(names)
		if err != nil {
			t.Fatal(err)
		}
		if b == "b1" {
			onVictim = append(onVictim, c)
		} else {
			others = append(others, c)
		}
	}
	if len(onVictim) < 4 || len(others) < 8 {
		t.Fatalf("clients: %d on b1, %d elsewhere", len(onVictim), len(others))
	}
	// b1 stops while a burst for it and for the others is on its way.
	all := append(append([]*net.UDPConn(nil), onVictim...), others...)
	for k := range 6 {
		for i, c := range all {
			if k == 2 && i == 0 {
				backends[0].stop()
			}
			if _, err := c.Write(fmt.Appendf(nil, "m%d", k)); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, c := range others {
		names, got := udpReplies(c, 6, 2*time.Second)
		if err := sameSet(got, numberedM(6)); err != nil {
			t.Fatalf("client %d of another backend: %v", i, err)
		}
		if b, err := oneBackend(names); err != nil || b == "b1" {
			t.Fatalf("client %d: answered by %v (%v)", i, names, err)
		}
	}
	// b1's clients got at most what left before it stopped.
	for _, c := range onVictim {
		if _, got := udpReplies(c, 6, 100*time.Millisecond); len(got) > 2+1 {
			t.Errorf("a client of the stopped backend got %d replies", len(got))
		}
	}
	// The sessions survive their backend's ICMP errors: when it is back,
	// its clients are answered by it again.
	backends[0].start(t)
	for i, c := range onVictim {
		names, _ := udpBurst(t, c, [][]byte{[]byte("again")}, 2*time.Second)
		if b, err := oneBackend(names); err != nil || b != "b1" {
			t.Errorf("client %d of b1 after its return: %v (%v)", i, names, err)
		}
	}
}

func numberedM(n int) [][]byte {
	out := make([][]byte, n)
	for k := range out {
		out[k] = fmt.Appendf(nil, "m%d", k)
	}
	return out
}

func TestUDPCapsAndIdleAcrossLoops(t *testing.T) {
	backends := startUDPEchoes(t, 2, 9033)
	port := freePort(t)
	p := newProxy(t, Options{MaxUDPSessions: 12, MaxUDPSessionsPerClient: 3})
	idle := time.Second
	p.apply(t, udpRule("caps", port, backends, func(r *snapshot.Rule) { r.IdleTimeout = idle }))
	sessions := func() float64 { return p.counter(p.metrics.udpSessions.WithLabelValues("default/caps")) }
	refused := func(reason string) float64 {
		return p.counter(p.metrics.refused.WithLabelValues("default/caps", reason))
	}

	// Four sources, four ports each: the fourth port of each is over the
	// per-source cap, wherever the kernel steers it; the last source's is
	// also over the listener's cap, which is checked first.
	var kept []*net.UDPConn
	for src := range 4 {
		for k := range 4 {
			c := udpClient(t, clientIP(200+src), port)
			wait := time.Second
			if k == 3 {
				wait = 100 * time.Millisecond // refused: nothing comes
			}
			names, _ := udpBurst(t, c, [][]byte{[]byte("hi")}, wait)
			if k < 3 && len(names) != 1 {
				t.Fatalf("source %d port %d: not served", src, k)
			}
			if k == 3 && len(names) != 0 {
				t.Fatalf("source %d: a fourth session was served; the cap is 3", src)
			}
			if k < 3 {
				kept = append(kept, c)
			}
		}
	}
	if got := refused(refusedClientLimit); got != 3 {
		t.Errorf("refused{client_limit} = %v, want 3", got)
	}
	if got := sessions(); got != 12 {
		t.Fatalf("udp_sessions = %v, want 12", got)
	}
	// The listener's cap (12) holds across the loops.
	c := udpClient(t, clientIP(210), port)
	if names, _ := udpBurst(t, c, [][]byte{[]byte("hi")}, 100*time.Millisecond); len(names) != 0 {
		t.Fatal("a thirteenth session was served; the cap is 12")
	}
	if got := refused(refusedSessionLimit); got != 2 {
		t.Errorf("refused{udp_session_limit} = %v, want 2", got)
	}

	// A session that keeps talking outlives the idle timeout; the others expire.
	active := kept[0]
	deadline := time.Now().Add(2 * idle)
	for time.Now().Before(deadline) {
		if names, _ := udpBurst(t, active, [][]byte{[]byte("tick")}, time.Second); len(names) != 1 {
			t.Fatal("the active session stopped answering")
		}
		time.Sleep(idle / 4)
	}
	eventually(t, 3*time.Second, "idle sessions expire", func() bool { return sessions() == 1 })
	if got := p.counter(p.metrics.idleTimeouts.WithLabelValues("default/caps")); got != 11 {
		t.Errorf("idle_timeouts = %v, want 11", got)
	}
	// Room again: the refused client is served now.
	if names, _ := udpBurst(t, c, [][]byte{[]byte("hi")}, time.Second); len(names) != 1 {
		t.Fatal("after the idle sessions expired, a new client was not served")
	}
	// Every datagram and reply was counted once, by backend (a reply is
	// counted right after it left, maybe after the client read it).
	packets := func(dir string) (n float64) {
		for _, b := range backends {
			n += p.counter(p.metrics.packets.WithLabelValues("default/caps", b.addr.String(), dir))
		}
		return n
	}
	eventually(t, time.Second, "replies counted", func() bool { return packets("out") == packets("in") })
	if in := packets("in"); in < 14 {
		t.Errorf("packet_count{in} = %v, want at least 14", in)
	}
}

// holdLoops stops every loop of p until release is called: datagrams
// queue meanwhile, and the next read takes them in one batch.
func holdLoops(p *testProxy) (release func()) {
	gate := make(chan struct{})
	var held sync.WaitGroup
	for _, lp := range p.loops {
		held.Add(1)
		lp.post(func() {
			held.Done()
			<-gate
		})
	}
	held.Wait()
	return func() { close(gate) }
}

// TestUDPWholeBatches makes the proxy read a client's burst in one batch
// and its backend's replies in another, so that the sending side of each
// sees whole runs of one destination: runs of one size, shorter last
// datagrams, and empty datagrams, which must never become segments.
func TestUDPWholeBatches(t *testing.T) {
	sizes := []int{300, 300, 300, 120, 0, 0, 300, 500, 500, 0, 64, 64, 64, 64, 63, 64, 1, 1, 0}
	for _, tc := range []struct {
		name          string
		gso, gsoFails bool
	}{{"gso", true, false}, {"no gso", false, false}, {"gso refused by the kernel", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Cleanup(func() { udpGSO.Store(true) })
			udpGSO.Store(tc.gso)
			port := freePort(t)
			// The backend answers only once it has the whole burst, while
			// the proxy is held.
			back := netip.AddrPortFrom(netip.MustParseAddr("127.0.1.1"), 9034)
			bc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(back))
			if err != nil {
				t.Fatal(err)
			}
			defer bc.Close()
			p := newProxy(t, Options{})
			r := rule("whole", port, nil, protocols(snapshot.UDP))
			r.Backends = []snapshot.Backend{{Addr: back}}
			p.apply(t, r)
			if tc.gsoFails {
				// Without UDP checksums the kernel refuses GSO (EINVAL):
				// the replies must go one by one instead.
				for _, l := range p.listeners {
					for _, pt := range l.(*udpListener).ports {
						if err := unix.SetsockoptInt(pt.fd, unix.SOL_SOCKET, unix.SO_NO_CHECK, 1); err != nil {
							t.Fatal(err)
						}
					}
				}
			}

			c := udpClient(t, clientIP(5), port)
			_ = c.SetReadBuffer(4 << 20)
			var msgs [][]byte
			for i, size := range sizes {
				msgs = append(msgs, bytes.Repeat([]byte{byte('a' + i)}, size))
			}
			release := holdLoops(p)
			for _, m := range msgs {
				if _, err := c.Write(m); err != nil {
					t.Fatal(err)
				}
			}
			release()
			// The backend reads the burst as it came.
			buf := make([]byte, 64<<10)
			var got [][]byte
			var from netip.AddrPort
			_ = bc.SetReadDeadline(time.Now().Add(2 * time.Second))
			for range msgs {
				n, f, err := bc.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatalf("backend: %d of %d datagrams: %v", len(got), len(msgs), err)
				}
				got, from = append(got, bytes.Clone(buf[:n])), f
			}
			for i := range msgs {
				if !bytes.Equal(got[i], msgs[i]) {
					t.Fatalf("backend's datagram %d: %d bytes %q..., want %d bytes", i, len(got[i]), got[i][:min(len(got[i]), 4)], len(msgs[i]))
				}
			}
			// Its replies wait on the session's socket until the proxy reads them all at once.
			release = holdLoops(p)
			for _, m := range msgs {
				if _, err := bc.WriteToUDPAddrPort(m, from); err != nil {
					t.Fatal(err)
				}
			}
			release()
			_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
			for i := range msgs {
				n, err := c.Read(buf)
				if err != nil {
					t.Fatalf("client: %d of %d replies: %v", i, len(msgs), err)
				}
				if !bytes.Equal(buf[:n], msgs[i]) {
					t.Fatalf("client's reply %d: %d bytes, want %d", i, n, len(msgs[i]))
				}
			}
		})
	}
}
