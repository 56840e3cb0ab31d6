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
	"unsafe"

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
	ln, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", k.Addr.String())
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
	defer p.tcpConns.Add(-1)
	if !p.clients.acquire(ip, p.opts.MaxConnectionsPerClient) {
		refuse(c, rs, refusedClientLimit)
		return
	}
	defer p.clients.release(ip)

	var buf [maxDialAttempts]*backend
	candidates := rs.pool.Load().pick(buf[:0], flowHash(rs.rule, client, local, snapshot.TCP), maxDialAttempts)
	if len(candidates) == 0 {
		refuse(c, rs, refusedNoBackend)
		return
	}
	dialer := net.Dialer{Timeout: p.opts.DialTimeout}
	for i, b := range candidates {
		conn, err := dialer.Dial("tcp", b.name)
		if err != nil {
			b.m.dialFailures.Inc()
			if i+1 < len(candidates) {
				rs.m.dialRetries.Inc()
			}
			continue
		}
		f := &tcpFlow{client: c, backend: conn.(*net.TCPConn), b: b, rs: rs}
		p.flows.add(f)
		b.m.syn.Inc()
		b.m.tcpFlows.Inc()
		f.run()
		b.m.tcpFlows.Dec()
		p.flows.remove(f)
		return
	}
	refuse(c, rs, refusedDialFailed)
}

// tcpFlow is one proxied connection: a client socket and a backend socket.
type tcpFlow struct {
	client, backend *net.TCPConn
	b               *backend
	rs              *ruleState

	lastActive atomic.Int64 // nanoseconds since epoch, monotonic
	timerMu    sync.Mutex
	timer      *time.Timer
	closeOnce  sync.Once
	finished   atomic.Bool
}

// epoch anchors lastActive to the monotonic clock.
var epoch = time.Now()

func (f *tcpFlow) touch() { f.lastActive.Store(int64(time.Since(epoch))) }

func (f *tcpFlow) run() {
	idle := f.rs.rule.IdleTimeout
	f.touch()
	f.timerMu.Lock()
	f.timer = time.AfterFunc(idle, f.checkIdle)
	f.timerMu.Unlock()

	done := make(chan struct{})
	go func() {
		defer close(done)
		f.pipe(f.backend, f.client, f.b.m.bytesIn)
	}()
	f.pipe(f.client, f.backend, f.b.m.bytesOut)
	<-done

	f.finished.Store(true)
	f.timerMu.Lock()
	f.timer.Stop()
	f.timerMu.Unlock()
	f.countPackets()
	f.abort()
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

// pipe copies src to dst until src ends, then half-closes dst. Any error
// aborts the whole flow.
//
// It waits for src to be readable before each splice and splices exactly the
// bytes queued, so an idle flow holds no splice pipe: Go's io.Copy between
// TCP sockets keeps a pipe pair for as long as it waits on a quiet source.
func (f *tcpFlow) pipe(dst, src *net.TCPConn, bytes interface{ Add(float64) }) {
	rc, err := src.SyscallConn()
	if err != nil {
		f.abort()
		return
	}
	lr := &io.LimitedReader{R: src}
	var peek [1]byte
	for {
		n, err := queued(rc, &peek)
		if err != nil {
			f.abort()
			return
		}
		if n == 0 {
			_ = dst.CloseWrite()
			return
		}
		f.touch()
		lr.N = int64(n)
		w, err := dst.ReadFrom(lr) // splice(2): the bytes never enter userspace
		bytes.Add(float64(w))
		if err != nil {
			f.abort()
			return
		}
		f.touch()
	}
}

// queued waits until the socket has data or has reached end of stream and
// returns the bytes queued (0 at end of stream).
func queued(rc syscall.RawConn, peek *[1]byte) (int, error) {
	var n int
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		for {
			avail, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			if err != nil {
				serr = err
				return true
			}
			if avail > 0 {
				n = avail
				return true
			}
			r, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&peek[0])), 1,
				unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
			switch {
			case errno == unix.EAGAIN || errno == unix.EINTR:
				return false // wait for the poller
			case errno != 0:
				serr = errno
				return true
			case r == 0:
				return true // end of stream
			}
			// Data arrived between the two calls: count it again.
		}
	})
	if err != nil {
		return 0, err
	}
	return n, serr
}

// countPackets adds the flow's segments, as the kernel counted them, to the
// packet counters.
func (f *tcpFlow) countPackets() {
	if in, ok := segmentsIn(f.client); ok {
		f.b.m.packetsIn.Add(float64(in))
	}
	if out, ok := segmentsIn(f.backend); ok {
		f.b.m.packetsOut.Add(float64(out))
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
