package proxy

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// onLoops runs fn on every loop of p, in turn, and waits for it.
func onLoops(p *testProxy, fn func(i int, l *loop)) {
	p.mu.Lock()
	loops := p.loops
	p.mu.Unlock()
	for i, l := range loops {
		l.do(func() { fn(i, l) })
	}
}

// TestBulkEchoIsIntactThroughBackpressure sends 16 MiB each way over four
// connections at once, with a client that reads the echo slowly: the proxy
// must hold what a full socket refuses and deliver every byte in order,
// whether the transfers stay on their loops or move to copiers. Once the
// transfers are done and the connections sit idle, no flow may still hold a
// copier, a buffer or a splice pipe.
func TestBulkEchoIsIntactThroughBackpressure(t *testing.T) {
	for _, tc := range []struct {
		name         string
		offloadAfter int
		slow         bool
	}{
		{"on the loops", 1 << 40, true},
		{"on copiers, slow reader", 64 << 10, true},
		{"on copiers, fast reader", 64 << 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			backends := startBackends(t, 2, 9020)
			port := freePort(t)
			p := newProxy(t, Options{loops: 2, offloadAfter: tc.offloadAfter})
			p.apply(t, rule("bulk", port, backends))
			conns := bulkEcho(t, port, 4, 16<<20, tc.slow)

			eventually(t, 5*time.Second, "copiers back on their loops", func() bool {
				busy := 0
				onLoops(p, func(_ int, l *loop) { busy += l.copiers })
				return busy == 0
			})
			flows, offloads := 0, 0
			onLoops(p, func(_ int, l *loop) {
				offloads += l.offloads
				l.flows.each(func(f *tcpFlow) {
					flows++
					for _, h := range []*half{&f.up, &f.down} {
						if h.busy || h.pipe != nil || h.pendBuf != nil || h.inPipe > 0 || len(h.pend) > 0 {
							t.Errorf("an idle flow holds copier=%v pipe=%v buffer=%v (%d+%d bytes)", h.busy, h.pipe != nil, h.pendBuf != nil, h.inPipe, len(h.pend))
						}
					}
				})
				if len(l.pipes) > maxFreePipes {
					t.Errorf("loop keeps %d free pipes, at most %d", len(l.pipes), maxFreePipes)
				}
			})
			if flows != len(conns) {
				t.Fatalf("%d flows on the loops, want %d", flows, len(conns))
			}
			if onCopiers := tc.offloadAfter < 16<<20; onCopiers != (offloads > 0) {
				t.Fatalf("%d directions went to copiers", offloads)
			}
			for _, c := range conns {
				c.Close()
			}
			eventually(t, 5*time.Second, "every flow closed", func() bool { return p.tcpConns.Load() == 0 })
		})
	}
}

// bulkEcho sends size random bytes over each of n connections to port at
// once and checks that the echo comes back intact; a slow client reads the
// echo in pauses, so the proxy has to hold what it cannot deliver. It
// returns the connections, still open.
func bulkEcho(t *testing.T, port uint16, n, size int, slow bool) []io.Closer {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	conns := make([]io.Closer, n)
	for i := range conns {
		c, err := dialFrom(clientIP(40+i), port)
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
		t.Cleanup(func() { c.Close() })
		r := bufio.NewReader(c)
		if _, err := r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		payload := make([]byte, size)
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		for j := range payload {
			payload[j] = byte(rng.Uint32())
		}
		want := sha256.Sum256(payload)
		wg.Go(func() {
			if _, err := c.Write(payload); err != nil {
				errs <- err
			}
		})
		wg.Go(func() {
			h := sha256.New()
			buf := make([]byte, 64<<10)
			var got int
			for got < size {
				n, err := r.Read(buf[:min(len(buf), size-got)])
				h.Write(buf[:n])
				got += n
				if err != nil {
					errs <- err
					return
				}
				if slow && got%(1<<20) < n {
					time.Sleep(20 * time.Millisecond) // the proxy must buffer, not drop
				}
			}
			if !bytes.Equal(h.Sum(nil), want[:]) {
				errs <- io.ErrUnexpectedEOF
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("bulk echo: %v", err)
	}
	return conns
}

// TestConnectionsSpreadOverLoops opens a burst of connections that one loop
// may well accept all at once: they must end up spread over the loops.
func TestConnectionsSpreadOverLoops(t *testing.T) {
	backends := startBackends(t, 2, 9022)
	port := freePort(t)
	p := newProxy(t, Options{loops: 2})
	p.apply(t, rule("spread", port, backends))

	const n = 16
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c, err := dialFrom(clientIP(60+i), port)
			if err != nil {
				t.Error(err)
				return
			}
			t.Cleanup(func() { c.Close() })
			if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	perLoop := make([]int, 2)
	onLoops(p, func(i int, l *loop) {
		l.flows.each(func(*tcpFlow) { perLoop[i]++ })
	})
	if perLoop[0]+perLoop[1] != n || perLoop[0] < n/2-2 || perLoop[1] < n/2-2 {
		t.Fatalf("flows per loop: %v, want %d spread evenly", perLoop, n)
	}
}

// TestProxiedSocketsHaveNoDelay checks that both sockets of a flow send
// small messages at once: the client side inherits TCP_NODELAY from the
// listener (which saves a system call per connection), the backend side
// sets it.
func TestProxiedSocketsHaveNoDelay(t *testing.T) {
	backends := startBackends(t, 1, 9024)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("nodelay", port, backends))
	mustBackendOf(t, clientIP(80), port)
	c, err := dialFrom(clientIP(81), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	// The first connection is closed; the proxy may not have seen it yet.
	eventually(t, 5*time.Second, "one flow left", func() bool { return p.tcpConns.Load() == 1 })
	checked := 0
	onLoops(p, func(_ int, l *loop) {
		l.flows.each(func(f *tcpFlow) {
			for _, fd := range []int{f.cfd, f.bfd} {
				v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
				if err != nil || v == 0 {
					t.Errorf("fd %d: TCP_NODELAY %d, %v", fd, v, err)
				}
				checked++
			}
		})
	})
	if checked != 2 {
		t.Fatalf("checked %d sockets, want the 2 of the open flow", checked)
	}
}

// TestTimerHeapOrder sets, moves and cancels timers at random and checks
// they fire in deadline order, each once, and the cancelled ones never.
func TestTimerHeapOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var fired []*testTimer
	var h timerHeap
	timers := make([]*testTimer, 500)
	for i := range timers {
		tt := &testTimer{fired: &fired}
		tt.t = timer{index: -1, owner: tt}
		timers[i] = tt
		h.set(&tt.t, time.Duration(rng.IntN(1000)))
	}
	for range 300 {
		tt := timers[rng.IntN(len(timers))]
		if rng.IntN(3) == 0 {
			h.cancel(&tt.t)
			h.cancel(&tt.t) // twice is harmless
			continue
		}
		h.set(&tt.t, time.Duration(rng.IntN(1000)))
	}
	queued := len(h)
	l := &loop{now: 1000}
	h.expire(l)
	if len(fired) != queued || len(h) != 0 {
		t.Fatalf("%d of %d queued timers fired; %d left", len(fired), queued, len(h))
	}
	for i, tt := range fired {
		if tt.count != 1 {
			t.Fatalf("a timer fired %d times", tt.count)
		}
		if i > 0 && tt.t.when < fired[i-1].t.when {
			t.Fatalf("timer %d fired at %v after one at %v", i, tt.t.when, fired[i-1].t.when)
		}
	}
	if got := h.waitMillis(0); got != -1 {
		t.Fatalf("empty heap waits %d ms, want -1 (forever)", got)
	}
}

type testTimer struct {
	t     timer
	count int
	fired *[]*testTimer
}

func (tt *testTimer) expire(*loop) {
	tt.count++
	*tt.fired = append(*tt.fired, tt)
}

// TestPacketCounts checks the TCP packet counters: every message of a closed
// connection went through as at least one segment each way.
func TestPacketCounts(t *testing.T) {
	backends := startBackends(t, 1, 9026)
	port := freePort(t)
	p := newProxy(t, Options{})
	r := rule("packets", port, backends)
	p.apply(t, r)
	c, err := dialFrom(clientIP(90), port)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	const messages = 20
	for i := range messages {
		if _, err := c.Write([]byte{byte(i), '\n'}); err != nil {
			t.Fatal(err)
		}
		if _, err := br.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	backend := backends[0].Addr.String()
	in := p.metrics.packets.WithLabelValues(r.Name, backend, "in")
	out := p.metrics.packets.WithLabelValues(r.Name, backend, "out")
	eventually(t, 5*time.Second, "packets counted at close", func() bool { return p.counter(in) > 0 })
	// In: the handshake's ACK, 20 messages, the FIN. Out: the banner, 20
	// echoes, the FIN (acknowledgements may ride on data, or not; on a
	// loaded machine the banner may leave in one segment with the first
	// echo).
	if got := p.counter(in); got < messages+2 || got > 4*messages {
		t.Errorf("packets in: %v, want %d to %d", got, messages+2, 4*messages)
	}
	if got := p.counter(out); got < messages+1 || got > 4*messages {
		t.Errorf("packets out: %v, want %d to %d", got, messages+1, 4*messages)
	}
}

// openFDs counts the process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestNoDescriptorLeaks runs many connections that end every way a client
// can end one (orderly close, reset, half-close, gone before the backend
// answered) against a pool with one dead backend, and checks that once they
// are over the proxy holds no flow and no descriptor more than before; with
// the bulk parts on the loops, and handed to copiers.
func TestNoDescriptorLeaks(t *testing.T) {
	t.Run("on the loops", func(t *testing.T) { testNoDescriptorLeaks(t, 1<<40) })
	t.Run("on copiers", func(t *testing.T) { testNoDescriptorLeaks(t, offloadSoon) })
}

func testNoDescriptorLeaks(t *testing.T, offloadAfter int) {
	backends := startBackends(t, 2, 9028)
	dead := netip.AddrPortFrom(netip.MustParseAddr("127.0.1.9"), 9028) // nothing listens
	port := freePort(t)
	p := newProxy(t, Options{loops: 2, offloadAfter: offloadAfter})
	r := rule("leaks", port, backends)
	r.Backends = append(r.Backends, snapshot.Backend{Addr: dead})
	p.apply(t, r)
	mustBackendOf(t, clientIP(100), port) // loops, listener and pipes exist from here on
	before := openFDs(t)

	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			c, err := dialFrom(clientIP(100+i%50), port)
			if err != nil {
				t.Error(err)
				return
			}
			br := bufio.NewReader(c)
			switch i % 4 {
			case 0: // orderly, after a bulk echo
				_, _ = br.ReadString('\n')
				go func() { _, _ = c.Write(append(bytes.Repeat([]byte("b"), 512<<10), '\n')) }()
				_, _ = br.ReadString('\n')
				c.Close()
			case 1: // reset mid-stream
				_, _ = br.ReadString('\n')
				_, _ = c.Write(bytes.Repeat([]byte("x"), 256<<10))
				_ = c.SetLinger(0)
				c.Close()
			case 2: // half-close, then read to the end
				_, _ = br.ReadString('\n')
				_, _ = c.Write([]byte("bye\n"))
				_ = c.CloseWrite()
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, _ = io.Copy(io.Discard, br)
				c.Close()
			case 3: // gone at once
				_ = c.SetLinger(0)
				c.Close()
			}
		})
	}
	wg.Wait()
	eventually(t, 10*time.Second, "every flow closed", func() bool { return p.tcpConns.Load() == 0 })
	flows := 0
	onLoops(p, func(_ int, l *loop) { l.flows.each(func(*tcpFlow) { flows++ }) })
	if flows != 0 {
		t.Fatalf("%d flows left on the loops", flows)
	}
	if n := copierOffloads(p); (offloadAfter == offloadSoon) != (n > 0) {
		t.Fatalf("%d directions went to copiers", n)
	}
	// The loops keep up to maxFreePipes free pipes each, for reuse; nothing
	// else may be left once the backends (in this process too) have seen
	// their connections end and Go has collected their io.Copy pipes.
	pipes := 0
	onLoops(p, func(_ int, l *loop) { pipes += len(l.pipes) })
	if !waitFor(10*time.Second, func() bool { runtime.GC(); return openFDs(t) <= before+2*pipes }) {
		t.Fatalf("%d descriptors open after the connections ended, %d before (%d free pipes)", openFDs(t), before, pipes)
	}
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}
