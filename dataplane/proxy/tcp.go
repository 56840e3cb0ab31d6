package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/maglev"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// tcpListener accepts connections for the rule it currently serves.
type tcpListener struct {
	p     *Proxy
	ln    *net.TCPListener
	local netip.AddrPort
	rule  atomic.Pointer[ruleState]
	start sync.Once
}

func (p *Proxy) listenTCP(k snapshot.ListenerKey) (listener, error) {
	// No TCP keepalive: the rule's idle timeout ends dead flows, as Azure's
	// does, and keepalive costs four setsockopt calls per connection.
	ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp", k.Addr.String())
	if err != nil {
		return nil, err
	}
	return &tcpListener{p: p, ln: ln.(*net.TCPListener), local: k.Addr}, nil
}

func (l *tcpListener) serve(rs *ruleState) {
	l.rule.Store(rs)
	l.start.Do(func() { go l.acceptLoop() })
}

func (l *tcpListener) close() { _ = l.ln.Close() }

func (l *tcpListener) acceptLoop() {
	var backoff time.Duration
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or similar: back off rather than spin,
			// and keep serving the connections we have.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.p.log.Error(err, "accept", "listener", l.local.String(), "retryIn", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go l.p.handleTCP(l.rule.Load(), l.local, c)
	}
}

// flowHash is the Maglev key of a new flow under the rule's session persistence.
func flowHash(r *snapshot.Rule, client, frontend netip.AddrPort, proto snapshot.Protocol) uint64 {
	switch r.Persistence {
	case snapshot.PersistenceClientIP:
		return maglev.HashClient(client.Addr().Unmap(), r.Frontend)
	case snapshot.PersistenceClientIPProtocol:
		return maglev.HashClientProtocol(client.Addr().Unmap(), r.Frontend, uint8(proto))
	}
	return maglev.HashFlow(client, frontend, uint8(proto))
}

// refuse closes c with a reset, so the client learns at once.
func refuse(c *net.TCPConn, rs *ruleState, reason string) {
	rs.m.refused[reason].Inc()
	_ = c.SetLinger(0)
	_ = c.Close()
}

func (p *Proxy) handleTCP(rs *ruleState, local netip.AddrPort, c *net.TCPConn) {
	client := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	ip := client.Addr().Unmap()
	if p.shutdown.Load() {
		refuse(c, rs, refusedDraining)
		return
	}
	if p.tcpConns.Add(1) > int64(p.opts.MaxConnections) {
		p.tcpConns.Add(-1)
		refuse(c, rs, refusedGlobalLimit)
		return
	}
	if !p.clients.acquire(ip, p.opts.MaxConnectionsPerClient) {
		p.tcpConns.Add(-1)
		refuse(c, rs, refusedClientLimit)
		return
	}
	// Once started, the flow releases both slots when it ends; until then, we do.
	released := false
	defer func() {
		if !released {
			p.clients.release(ip)
			p.tcpConns.Add(-1)
		}
	}()

	var buf [maxDialAttempts]*backend
	candidates := rs.pool.Load().pick(buf[:0], flowHash(rs.rule, client, local, snapshot.TCP), maxDialAttempts)
	if len(candidates) == 0 {
		refuse(c, rs, refusedNoBackend)
		return
	}
	dialer := net.Dialer{Timeout: p.opts.DialTimeout, KeepAlive: -1}
	for i, b := range candidates {
		conn, err := dialer.Dial("tcp", b.name)
		if err != nil {
			b.m().dialFailures.Inc()
			if i+1 < len(candidates) {
				rs.m.dialRetries.Inc()
			}
			continue
		}
		f := &tcpFlow{p: p, client: c, backend: conn.(*net.TCPConn), b: b, rs: rs, clientIP: ip}
		p.flows.add(f)
		b.m().syn.Inc()
		b.m().tcpFlows.Inc()
		released = true
		f.start()
		return
	}
	refuse(c, rs, refusedDialFailed)
}

// tcpFlow is one proxied connection: a client socket and a backend socket,
// copied by one goroutine each way.
type tcpFlow struct {
	p               *Proxy
	client, backend *net.TCPConn
	b               *backend
	rs              *ruleState
	clientIP        netip.Addr

	lastActive atomic.Int64 // nanoseconds since epoch, monotonic
	timerMu    sync.Mutex
	timer      *time.Timer
	closeOnce  sync.Once
	finished   atomic.Bool
	running    atomic.Int32 // directions still copying
}

// epoch anchors lastActive to the monotonic clock.
var epoch = time.Now()

func (f *tcpFlow) touch() { f.lastActive.Store(int64(time.Since(epoch))) }

// start copies both ways on two fresh goroutines: the accepting goroutine's
// stack grew while dialling, and an idle flow should not keep it.
func (f *tcpFlow) start() {
	f.touch()
	f.timerMu.Lock()
	f.timer = time.AfterFunc(f.rs.rule.IdleTimeout, f.checkIdle)
	f.timerMu.Unlock()
	f.running.Store(2)
	go f.copy(f.backend, f.client, f.b.m().bytesIn)
	go f.copy(f.client, f.backend, f.b.m().bytesOut)
}

// copy runs one direction and, as the last one out, ends the flow.
func (f *tcpFlow) copy(dst, src *net.TCPConn, bytes prometheus.Counter) {
	d := direction{f: f, dst: dst, src: src, bytes: bytes}
	d.run()
	if f.running.Add(-1) == 0 {
		f.end()
	}
}

// end releases everything the flow holds.
func (f *tcpFlow) end() {
	f.finished.Store(true)
	f.timerMu.Lock()
	f.timer.Stop()
	f.timerMu.Unlock()
	f.countPackets()
	f.abort()
	f.b.m().tcpFlows.Dec()
	f.p.clients.release(f.clientIP)
	f.p.tcpConns.Add(-1)
	f.p.flows.remove(f)
}

// checkIdle runs when the flow may have been idle for the rule's idle
// timeout; it closes the flow or re-arms for the remaining time.
func (f *tcpFlow) checkIdle() {
	if f.finished.Load() {
		return
	}
	idle := f.rs.rule.IdleTimeout
	quiet := time.Since(epoch) - time.Duration(f.lastActive.Load())
	if quiet < idle {
		f.timerMu.Lock()
		f.timer.Reset(idle - quiet)
		f.timerMu.Unlock()
		return
	}
	f.rs.m.idleTimeouts.Inc()
	if f.rs.rule.TCPReset {
		// SO_LINGER 0 makes close send a RST: both sides learn the flow is gone.
		_ = f.client.SetLinger(0)
		_ = f.backend.SetLinger(0)
	}
	f.abort()
}

// abort closes both sockets, which ends both copy loops.
func (f *tcpFlow) abort() {
	f.closeOnce.Do(func() {
		_ = f.client.Close()
		_ = f.backend.Close()
	})
}

// copyBuffers lend a buffer to a direction only between a read and its
// write, so an idle flow holds none.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, copyBufferSize); return &b }}

// copyBufferSize is what one read moves; a read that fills it means a bulk
// transfer, which continues with splice(2).
const copyBufferSize = 16 << 10

// direction copies src to dst until src ends, then half-closes dst. Any
// error aborts the whole flow.
//
// It reads only when the poller says src is readable, into a buffer
// borrowed for that one read, and moves bulk data with splice(2) for exactly
// the bytes queued. So a quiet flow holds neither a buffer nor a splice pipe
// (Go's io.Copy between TCP sockets keeps a pipe pair while it waits), a
// small message costs one read and one write, and bulk data mostly never
// enters userspace.
type direction struct {
	f        *tcpFlow
	dst, src *net.TCPConn
	bytes    prometheus.Counter

	raw    syscall.RawConn
	buf    *[]byte
	n      int
	err    error
	queued int
	lr     io.LimitedReader
}

func (d *direction) run() {
	var err error
	if d.raw, err = d.src.SyscallConn(); err != nil {
		d.f.abort()
		return
	}
	d.lr.R = d.src
	read, inq := d.read, d.inq // bound once: no allocation per call
	for {
		if err := d.raw.Read(read); err != nil {
			d.f.abort()
			return
		}
		n, rerr := d.n, d.err
		if rerr != nil || n == 0 {
			copyBuffers.Put(d.buf)
			if rerr != nil {
				d.f.abort()
			} else {
				_ = d.dst.CloseWrite()
			}
			return
		}
		d.f.touch()
		_, werr := d.dst.Write((*d.buf)[:n])
		copyBuffers.Put(d.buf)
		d.bytes.Add(float64(n))
		if werr != nil {
			d.f.abort()
			return
		}
		// A full read means a bulk transfer: splice(2) what is queued, and
		// keep going while more arrives; never wait with the pipe held.
		for n == copyBufferSize {
			if err := d.raw.Control(inq); err != nil || d.queued <= 0 {
				break
			}
			d.lr.N = int64(d.queued)
			w, err := d.dst.ReadFrom(&d.lr)
			d.bytes.Add(float64(w))
			if err != nil {
				d.f.abort()
				return
			}
		}
		d.f.touch()
	}
}

// read is called by the poller: it reads once, and when nothing is there it
// returns the buffer and asks to wait.
func (d *direction) read(fd uintptr) bool {
	bp := copyBuffers.Get().(*[]byte)
	n, err := unix.Read(int(fd), *bp)
	if err == unix.EAGAIN || err == unix.EINTR {
		copyBuffers.Put(bp)
		return false
	}
	d.buf, d.n, d.err = bp, n, err
	return true
}

// inq records the bytes queued on the socket.
func (d *direction) inq(fd uintptr) {
	n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	if err != nil {
		n = 0
	}
	d.queued = n
}

// countPackets adds the flow's segments, as the kernel counted them, to the
// packet counters.
func (f *tcpFlow) countPackets() {
	if in, ok := segmentsIn(f.client); ok {
		f.b.m().packetsIn.Add(float64(in))
	}
	if out, ok := segmentsIn(f.backend); ok {
		f.b.m().packetsOut.Add(float64(out))
	}
}

func segmentsIn(c *net.TCPConn) (uint32, bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	cerr := rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	})
	if cerr != nil || err != nil {
		return 0, false
	}
	return info.Segs_in, true
}
