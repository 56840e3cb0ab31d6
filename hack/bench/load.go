package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type runner struct {
	config
	tmp         string
	backendPort int // the backends' plain port
	// v2BackendPort is the backends' port where each connection must open
	// with a PROXY protocol v2 header.
	v2BackendPort int
	round         int // the round running, for notes
	notes         []string
	// connIPs is, per target, the most distinct client IPs one run of the
	// short-connections test used.
	connIPs map[string]int
}

// note records something the reader of the table should know, once.
func (r *runner) note(format string, args ...any) {
	n := fmt.Sprintf(format, args...)
	if !slices.Contains(r.notes, n) {
		r.notes = append(r.notes, n)
	}
}

// A measurement is one test; it fills one or more rows of the table.
type measurement struct {
	name        string
	rows        []row
	proxiedOnly bool // measures the proxy process: n/a for direct
	udp         bool // HAProxy cannot proxy UDP
	run         func(r *runner, s *session) ([]float64, error)
}

var (
	errNotApplicable = errors.New("not applicable")
	errUnavailable   = errors.New("unavailable")
)

func isSkip(err error) bool {
	return errors.Is(err, errNotApplicable) || errors.Is(err, errUnavailable)
}

const (
	bulkStreams = 8
	connWorkers = 32
	udpSockets  = 32
	udpWindow   = 8 // datagrams in flight per socket
	udpSize     = 64
	// The UDP variants: many sources with one datagram in flight each (a
	// DNS-like load, a session each), and large datagrams.
	udpManySockets  = 1000
	udpManyWindow   = 1
	udpLargeSize    = 1400
	dialTimeout     = 5 * time.Second
	ioTimeout       = 5 * time.Second
	idleOpenWorkers = 32
	idleOpenTimeout = 30 * time.Second
)

func (r *runner) measurements() []measurement {
	return []measurement{
		{name: "upload", rows: []row{{Key: "upload", Label: fmt.Sprintf("bulk upload, %d streams", bulkStreams), Unit: "Gbit/s", Better: higher, Prec: 2}},
			run: func(r *runner, s *session) ([]float64, error) { return r.bulk(s, modeDiscard) }},
		{name: "download", rows: []row{{Key: "download", Label: fmt.Sprintf("bulk download, %d streams", bulkStreams), Unit: "Gbit/s", Better: higher, Prec: 2}},
			run: func(r *runner, s *session) ([]float64, error) { return r.bulk(s, modeSource) }},
		{name: "connections", rows: []row{
			{Key: "conn_rate", Label: fmt.Sprintf("short connections, %d workers", connWorkers), Unit: "conn/s", Better: higher, Prec: 0},
			{Key: "conn_errors", Label: "  failed connections", Unit: "count", Prec: 0},
		}, run: (*runner).connectionRate},
		{name: "latency", rows: []row{
			{Key: "latency_p50", Label: "ping-pong 64 B, p50", Unit: "µs", Better: lower, Prec: 1},
			{Key: "latency_p99", Label: "ping-pong 64 B, p99", Unit: "µs", Better: lower, Prec: 1},
		}, run: (*runner).latency},
		{name: "idle", proxiedOnly: true, rows: []row{
			{Key: "idle_rss", Label: fmt.Sprintf("idle TCP conns (%d), RSS", r.idleConns), Unit: "KiB/conn", Better: lower, Prec: 2},
			{Key: "idle_fds", Label: fmt.Sprintf("idle TCP conns (%d), fds", r.idleConns), Unit: "fds/conn", Better: lower, Prec: 2},
		}, run: (*runner).idle},
		{name: "udp", udp: true, rows: []row{{Key: "udp_rate", Label: fmt.Sprintf("UDP echo %d B, %d sources × %d in flight", udpSize, udpSockets, udpWindow), Unit: "datagrams/s", Better: higher, Prec: 0}, udpCPURow("udp_cpu")},
			run: func(r *runner, s *session) ([]float64, error) {
				return r.udpRate(s, udpLoad{sources: udpSources, sockets: udpSockets, window: udpWindow, size: udpSize})
			}},
		{name: "udp1000", udp: true, rows: []row{{Key: "udp_rate_1000", Label: fmt.Sprintf("UDP echo %d B, %d sources × %d in flight", udpSize, udpManySockets, udpManyWindow), Unit: "datagrams/s", Better: higher, Prec: 0}, udpCPURow("udp_cpu_1000")},
			run: func(r *runner, s *session) ([]float64, error) {
				return r.udpRate(s, udpLoad{sources: udpManySources, sockets: udpManySockets, window: udpManyWindow, size: udpSize})
			}},
		{name: "udp1400", udp: true, rows: []row{{Key: "udp_rate_1400", Label: fmt.Sprintf("UDP echo %d B, %d sources × %d in flight", udpLargeSize, udpSockets, udpWindow), Unit: "datagrams/s", Better: higher, Prec: 0}, udpCPURow("udp_cpu_1400")},
			run: func(r *runner, s *session) ([]float64, error) {
				return r.udpRate(s, udpLoad{sources: udpSources, sockets: udpSockets, window: udpWindow, size: udpLargeSize})
			}},
	}
}

// udpCPURow is the proxy's CPU time per echoed datagram (both directions,
// user and system, the process and its children) over a UDP test's window:
// on a shared machine it moves less than the rate does.
func udpCPURow(key string) row {
	return row{Key: key, Label: "  proxy CPU per echo", Unit: "µs", Better: lower, Prec: 2}
}

// selected returns the measurements -tests names, all by default.
func (r *runner) selected() ([]measurement, error) {
	all := r.measurements()
	if r.tests == "" {
		return all, nil
	}
	var out []measurement
	for name := range strings.SplitSeq(r.tests, ",") {
		i := slices.IndexFunc(all, func(m measurement) bool { return m.name == name })
		if i < 0 {
			return nil, fmt.Errorf("-tests: unknown test %q", name)
		}
		out = append(out, all[i])
	}
	return out, nil
}

// measure runs one test against a fresh instance of the target.
func (r *runner) measure(m measurement, t *target) ([]float64, error) {
	switch {
	case m.proxiedOnly && t.name == targetDirect, m.udp && t.name == targetHAProxy,
		t.only != "" && t.only != m.name, t.udpOnly && !m.udp:
		return nil, errNotApplicable
	case t.unavailable != "":
		return nil, errUnavailable
	}
	s, err := r.start(t)
	if err != nil {
		if _, ok := errors.AsType[*startError](err); ok {
			t.unavailable = err.Error()
			return nil, errUnavailable
		}
		return nil, err
	}
	values, err := m.run(r, s)
	if serr := s.stop(); serr != nil {
		r.note("%v", serr)
	}
	return values, err
}

// Client source addresses. Each test draws from its own range of 127.0.0.0/8,
// so ClientIP persistence sees many clients and one test's TIME_WAIT sockets
// never collide with another's.
type sourcePool struct{ second, third, size int } // 127.second.third.1 upward, 254 per /24

func (p sourcePool) addr(i int) netip.Addr {
	k := i % p.size
	n := p.third + k/254 // the /24, counted from 127.second.0.0/24
	return netip.AddrFrom4([4]byte{127, byte(p.second + n/256), byte(n % 256), byte(1 + k%254)})
}

// The short-connections test's clients come in groups of connSpacing
// addresses, and each group connects connReuse times over: a client's
// first connection makes its pin, the next ones (each connSpacing
// connections after the one before, long finished) look it up. So one
// connection in connReuse makes a pin whatever the rate, as long as the
// pool lasts: at 20,000 conn/s, a run of 4.5 s uses 22,500 of its million
// addresses.
const (
	connReuse   = 4
	connSpacing = 1000
)

// connClient is the client (index in connSources) of the i-th connection.
func connClient(i int) int {
	return i/(connReuse*connSpacing)*connSpacing + i%connSpacing
}

// connClients is how many distinct clients the first n connections use.
func connClients(n int) int {
	return n/(connReuse*connSpacing)*connSpacing + min(n%(connReuse*connSpacing), connSpacing)
}

var (
	connSources = sourcePool{second: 16, size: 16 * 256 * 254} // 127.16.0.1-127.31.255.254
	idleSources = sourcePool{third: 4, size: 4 * 254}          // 127.0.4.1-127.0.7.254
	udpSources  = sourcePool{third: 8, size: udpSockets}
	// 127.0.12.1-127.0.15.238
	udpManySources = sourcePool{third: 12, size: udpManySockets}
	bulkSources    = sourcePool{third: 9, size: bulkStreams}
	pingSource     = sourcePool{third: 10, size: 1}
)

// ipBindAddressNoPort is IP_BIND_ADDRESS_NO_PORT (linux/in.h): bind picks the
// source port at connect time, per destination, instead of reserving one of
// the source address's ports for good at bind time.
const ipBindAddressNoPort = 24

func dialFrom(ctx context.Context, src netip.Addr, dst string) (*net.TCPConn, error) {
	d := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: src.AsSlice()},
		Timeout:   dialTimeout,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
	c, err := d.DialContext(ctx, "tcp", dst)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// sample lets the load run through the warm-up, then returns how much the
// counter advanced over the measured window and how long that was. It stops
// early with the first error the load reports.
func (r *runner) sample(failed <-chan error, counter func() int64) (int64, time.Duration, error) {
	wait := func(d time.Duration) error {
		select {
		case err := <-failed:
			return err
		case <-time.After(d):
			return nil
		}
	}
	if err := wait(r.warmup); err != nil {
		return 0, 0, err
	}
	c0, t0 := counter(), time.Now()
	if err := wait(r.window); err != nil {
		return 0, 0, err
	}
	return counter() - c0, time.Since(t0), nil
}

// counters are per-goroutine, on separate cache lines, summed when sampled.
type counters []struct {
	n atomic.Int64
	_ [56]byte
}

func (c counters) sum() int64 {
	var s int64
	for i := range c {
		s += c[i].n.Load()
	}
	return s
}

// bulk measures throughput in Gbit/s over bulkStreams connections: mode
// discard sends from client to backend, mode source the other way.
func (r *runner) bulk(s *session, mode byte) ([]float64, error) {
	conns := make([]*net.TCPConn, 0, bulkStreams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range bulkStreams {
		c, err := dialFrom(context.Background(), bulkSources.addr(i), s.tcp(i))
		if err != nil {
			return nil, fmt.Errorf("stream %d: %w", i, err)
		}
		conns = append(conns, c)
		if _, err := c.Write([]byte{mode}); err != nil {
			return nil, fmt.Errorf("stream %d: %w", i, err)
		}
	}
	moved := make(counters, bulkStreams)
	failed := make(chan error, bulkStreams)
	var stopping atomic.Bool
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			buf := make([]byte, bulkBufferSize)
			for {
				var n int
				var err error
				if mode == modeDiscard {
					n, err = c.Write(buf)
				} else {
					n, err = c.Read(buf)
				}
				moved[i].n.Add(int64(n))
				if err != nil {
					if !stopping.Load() {
						failed <- fmt.Errorf("stream %d: %w", i, err)
					}
					return
				}
			}
		})
	}
	n, elapsed, err := r.sample(failed, moved.sum)
	stopping.Store(true)
	for _, c := range conns {
		c.Close()
	}
	wg.Wait()
	if err != nil {
		return nil, err
	}
	return []float64{float64(n) * 8 / elapsed.Seconds() / 1e9}, nil
}

// connectionRate measures connect, echo a few bytes, close, from connWorkers
// workers drawing clients from connSources (see connClient); it also counts
// the failures.
func (r *runner) connectionRate(s *session) ([]float64, error) {
	ctx, cancel := context.WithCancel(context.Background())
	var next atomic.Int64
	done := make(counters, connWorkers)
	errs := make(counters, connWorkers)
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for w := range connWorkers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if err := shortConnection(ctx, connSources.addr(connClient(i)), s.tcp(i)); err != nil {
					if ctx.Err() != nil {
						return
					}
					errs[w].n.Add(1)
					once.Do(func() { firstErr = err })
					time.Sleep(10 * time.Millisecond)
					continue
				}
				done[w].n.Add(1)
			}
		})
	}
	n, elapsed, _ := r.sample(nil, done.sum)
	cancel()
	wg.Wait()
	if r.connIPs == nil {
		r.connIPs = map[string]int{}
	}
	r.connIPs[s.name()] = max(r.connIPs[s.name()], connClients(int(next.Load())))
	failures := errs.sum() // over warm-up and window: any failure matters
	if failures > 0 {
		r.note("%s short connections, round %d: first failure: %v", s.name(), r.round, firstErr)
	}
	return []float64{float64(n) / elapsed.Seconds(), float64(failures)}, nil
}

var (
	ping        = []byte("ping")
	pingRequest = append([]byte{modeEcho}, ping...)
)

func shortConnection(ctx context.Context, src netip.Addr, dst string) error {
	c, err := dialFrom(ctx, src, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write(pingRequest); err != nil {
		return err
	}
	var buf [4]byte
	n, err := io.ReadFull(c, buf[:])
	if n > 0 && buf[0] == refusedMark {
		// A PROXY v2 backend that got no valid header says why.
		why, _ := io.ReadAll(io.LimitReader(c, 200))
		return fmt.Errorf("the backend refused the connection: %s", bytes.TrimSpace(append(buf[1:n], why...)))
	}
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(buf[:], ping) {
		return fmt.Errorf("echo returned %q", buf[:])
	}
	return nil
}

// latency measures 64-byte ping-pong round trips over one connection and
// returns p50 and p99 in microseconds.
func (r *runner) latency(s *session) ([]float64, error) {
	c, err := dialFrom(context.Background(), pingSource.addr(0), s.tcp(0))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte{modeEcho}); err != nil {
		return nil, err
	}
	msg, reply := bytes.Repeat([]byte{'x'}, 64), make([]byte, 64)
	warm := r.pingPongs / 10
	rtts := make([]time.Duration, 0, r.pingPongs)
	for i := range warm + r.pingPongs {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			return nil, fmt.Errorf("round trip %d: %w", i, err)
		}
		if i >= warm {
			rtts = append(rtts, time.Since(t0))
		}
	}
	slices.Sort(rtts)
	pct := func(p int) float64 { return float64(rtts[len(rtts)*p/100]) / float64(time.Microsecond) }
	return []float64{pct(50), pct(99)}, nil
}

// idle opens r.idleConns connections from many client IPs, each echoing one
// byte so the proxy has dialed its backend, and returns the growth of the
// proxy's RSS (KiB) and fd count per connection.
func (r *runner) idle(s *session) ([]float64, error) {
	pid := s.pid()
	// Let one-time costs (first accept, first dial, pools) land before the baseline.
	warm, err := openEchoed(s, 200, 0)
	closeConns(warm)
	if err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	time.Sleep(300 * time.Millisecond)
	rss0, fds0, err := procStats(pid)
	if err != nil {
		return nil, err
	}
	conns, err := openEchoed(s, r.idleConns, 1000)
	defer closeConns(conns)
	n := len(conns)
	if err != nil {
		if n < r.idleConns/2 {
			return nil, fmt.Errorf("opened %d of %d connections: %w", n, r.idleConns, err)
		}
		r.note("%s idle test, round %d: opened %d of %d connections: %v", s.name(), r.round, n, r.idleConns, err)
	}
	time.Sleep(time.Second)
	rss1, fds1, err := procStats(pid)
	if err != nil {
		return nil, err
	}
	return []float64{float64(rss1-rss0) / float64(n), float64(fds1-fds0) / float64(n)}, nil
}

// openEchoed opens n echo connections from idleSources (starting at source
// index first) and returns those that echoed a byte, with the first error.
// It gives up after idleOpenTimeout or once more than 5% have failed, so a
// proxy that stops accepting costs seconds, not a dial timeout per connection.
func openEchoed(s *session, n, first int) ([]*net.TCPConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), idleOpenTimeout)
	defer cancel()
	var mu sync.Mutex
	conns := make([]*net.TCPConn, 0, n)
	var firstErr error
	failures := 0
	var next atomic.Int64
	var wg sync.WaitGroup
	for range idleOpenWorkers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c, err := openOne(ctx, idleSources.addr(first+i), s.tcp(i))
				mu.Lock()
				if err == nil {
					conns = append(conns, c)
				} else {
					if firstErr == nil {
						firstErr = err
					}
					if failures++; failures > n/20 {
						cancel()
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if firstErr == nil && len(conns) < n {
		firstErr = fmt.Errorf("gave up after %s", idleOpenTimeout)
	}
	return conns, firstErr
}

func openOne(ctx context.Context, src netip.Addr, dst string) (*net.TCPConn, error) {
	c, err := dialFrom(ctx, src, dst)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(ioTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.SetDeadline(deadline)
	var b [1]byte
	if _, err := c.Write([]byte{modeEcho, 'x'}); err == nil {
		_, err = io.ReadFull(c, b[:])
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("echo through %s: %w", dst, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

func closeConns(conns []*net.TCPConn) {
	for _, c := range conns {
		c.Close()
	}
}

// udpLoad is one UDP echo workload.
type udpLoad struct {
	sources sourcePool
	sockets int // client sockets, one per source address
	window  int // datagrams in flight per socket
	size    int // bytes per datagram
}

// udpRate measures UDP echoes per second of ld: a connected client socket
// per source address (each its own session), ld.window datagrams of ld.size
// bytes in flight on each.
func (r *runner) udpRate(s *session, ld udpLoad) ([]float64, error) {
	conns := make([]*net.UDPConn, 0, ld.sockets)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range ld.sockets {
		raddr, err := net.ResolveUDPAddr("udp", s.udp(i))
		if err != nil {
			return nil, err
		}
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: ld.sources.addr(i).AsSlice()}, raddr)
		if err != nil {
			return nil, err
		}
		conns = append(conns, c)
		_ = c.SetReadBuffer(1 << 20)
		// The first echo proves the flow works before the clock starts.
		if err := udpFirstEcho(c); err != nil {
			return nil, fmt.Errorf("socket %d (%s): %w", i, c.LocalAddr(), err)
		}
	}
	echoed := make(counters, ld.sockets)
	lost := make(counters, ld.sockets)
	var stopping atomic.Bool
	failed := make(chan error, ld.sockets)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			msg, buf := bytes.Repeat([]byte{'u'}, ld.size), make([]byte, 2048)
			inFlight := 0
			var renewed time.Time
			for !stopping.Load() {
				for ; inFlight < ld.window; inFlight++ {
					if _, err := c.Write(msg); err != nil {
						if !stopping.Load() {
							failed <- fmt.Errorf("socket %d: %w", i, err)
						}
						return
					}
				}
				// A deadline per read costs as much as the echo: renew it
				// now and then, so that it is always 150-250 ms away (with
				// a source that echoes only tens of times a second, as with
				// 1,000 sources, a renewal every so many reads would let it
				// expire under a datagram still on its way).
				if now := time.Now(); now.Sub(renewed) > 100*time.Millisecond {
					_ = c.SetReadDeadline(now.Add(250 * time.Millisecond))
					renewed = now
				}
				n, err := c.Read(buf)
				if err != nil {
					if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
						lost[i].n.Add(int64(inFlight))
						inFlight, renewed = 0, time.Time{}
						continue
					}
					if !stopping.Load() {
						failed <- fmt.Errorf("socket %d: %w", i, err)
					}
					return
				}
				if n == len(hello) {
					continue // a late answer to udpFirstEcho's retries
				}
				if n != ld.size && !stopping.Load() {
					failed <- fmt.Errorf("socket %d: a %d-byte echo of a %d-byte datagram", i, n, ld.size)
					return
				}
				inFlight--
				echoed[i].n.Add(1)
			}
		})
	}
	l0 := lost.sum()
	// sample reads the counter when the window opens and when it closes:
	// the proxy's CPU time is read at the same moments.
	var cpu []int64
	counter := func() int64 {
		if pid := s.pid(); pid > 0 {
			cpu = append(cpu, processTreeTicks(pid))
		}
		return echoed.sum()
	}
	n, elapsed, err := r.sample(failed, counter)
	stopping.Store(true)
	wg.Wait()
	if err != nil {
		return nil, err
	}
	if l := lost.sum() - l0; l > 0 {
		r.note("%s UDP %d B × %d sources, round %d: %d datagrams unanswered within 250 ms", s.name(), ld.size, ld.sockets, r.round, l)
	}
	perDatagram := math.NaN() // n/a: no proxy
	if len(cpu) == 2 && n > 0 && cpu[0] >= 0 && cpu[1] >= 0 {
		perDatagram = float64(cpu[1]-cpu[0]) * 1e6 / float64(clockTicks) / float64(n)
	}
	return []float64{float64(n) / elapsed.Seconds(), perDatagram}, nil
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat's times.
const clockTicks = 100

// processTreeTicks is the CPU time (user and system, in clock ticks) of a
// process and its children (nginx's workers), -1 if unreadable.
func processTreeTicks(pid int) int64 {
	total, ok := int64(0), false
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// After the command's closing parenthesis: state, ppid, ... utime
		// (field 14) and stime (15).
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		if p != pid && ppid != pid {
			continue
		}
		ut, err1 := strconv.ParseInt(f[11], 10, 64)
		st, err2 := strconv.ParseInt(f[12], 10, 64)
		if err1 == nil && err2 == nil {
			total += ut + st
			ok = ok || p == pid
		}
	}
	if !ok {
		return -1
	}
	return total
}

var hello = []byte("hello")

func udpFirstEcho(c *net.UDPConn) error {
	buf := make([]byte, 2048)
	var err error
	for range 10 {
		if _, err = c.Write(hello); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err = c.Read(buf); err == nil {
			return nil
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			// Nothing listens yet: a proxy serving TCP and UDP on the port
			// may have opened its TCP side first.
			time.Sleep(50 * time.Millisecond)
		}
	}
	return fmt.Errorf("no echo after 10 tries: %w", err)
}

func (s *session) name() string {
	if s.proxy == nil {
		return targetDirect
	}
	return s.proxy.name
}

func logProgress(round int, m measurement, t *target, values []float64, err error, took time.Duration) {
	msg := ""
	switch {
	case errors.Is(err, errNotApplicable):
		return
	case err != nil:
		msg = err.Error()
		if len(msg) > 160 {
			msg = msg[:160] + "…"
		}
	default:
		for i, v := range values {
			msg += fmt.Sprintf(" %s %s", formatValue(v, m.rows[i].Prec), m.rows[i].Unit)
		}
	}
	fmt.Fprintf(os.Stderr, "bench: round %d %-12s %-15s %5.1fs %s\n", round, m.name, t.name, took.Seconds(), msg)
}
