package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// maxDatagram is the largest UDP payload.
const maxDatagram = 64 << 10

// datagrams lends reply buffers to sessions only while they copy one
// datagram, so an idle session holds no buffer.
var datagrams = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// udpListener serves one rule's UDP frontend: a session per client
// address:port, each with its own connected socket to its backend.
type udpListener struct {
	p     *Proxy
	conn  *net.UDPConn
	local netip.AddrPort
	rule  atomic.Pointer[ruleState]
	start sync.Once

	mu       sync.Mutex // guards sessions and closed
	sessions sessionTable[*udpSession]
	closed   bool
}

func (p *Proxy) listenUDP(k snapshot.ListenerKey) (listener, error) {
	pc, err := (&net.ListenConfig{}).ListenPacket(context.Background(), "udp", k.Addr.String())
	if err != nil {
		return nil, err
	}
	l := &udpListener{p: p, conn: pc.(*net.UDPConn), local: k.Addr}
	l.sessions.init(p.opts.MaxUDPSessions, p.opts.MaxUDPSessionsPerClient)
	return l, nil
}

func (l *udpListener) serve(rs *ruleState) {
	l.rule.Store(rs)
	l.start.Do(func() { go l.readLoop() })
}

func (l *udpListener) close() {
	_ = l.conn.Close()
	l.mu.Lock()
	l.closed = true
	all := l.sessions.all()
	l.mu.Unlock()
	for _, s := range all {
		s.end()
	}
}

// readLoop reads client datagrams and forwards each to its session's backend.
func (l *udpListener) readLoop() {
	buf := make([]byte, maxDatagram)
	for {
		n, client, err := l.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		rs := l.rule.Load()
		pl := rs.pool.Load()
		s := l.session(client)
		if s != nil && s.pool != pl {
			// The pool changed since this session last looked: it keeps its
			// backend only if that backend is still in the pool and not probed down.
			if _, ok := pl.alive[s.b.addr]; ok {
				s.pool = pl
			} else {
				s.end()
				s = nil
			}
		}
		if s == nil {
			if s = l.newSession(rs, pl, client); s == nil {
				continue
			}
		}
		s.touch()
		if _, err := s.conn.Write(buf[:n]); err == nil {
			s.b.m().packetsIn.Inc()
			s.b.m().bytesIn.Add(float64(n))
		}
	}
}

func (l *udpListener) session(client netip.AddrPort) *udpSession {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sessions.get(client)
}

// newSession picks the client's backend and opens a connected socket to it,
// within the session caps; nil means the datagram is dropped.
func (l *udpListener) newSession(rs *ruleState, pl *pool, client netip.AddrPort) *udpSession {
	var buf [1]*backend
	picked := l.p.choose(rs, buf[:0], flowHash(rs.rule, client, l.local, snapshot.UDP), client.Addr().Unmap(), 1)
	if len(picked) == 0 {
		rs.m.refused[refusedNoBackend].Inc()
		return nil
	}
	b := picked[0]
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(b.addr))
	if err != nil {
		b.m().dialFailures.Inc()
		return nil
	}
	s := &udpSession{l: l, client: client, rs: rs, pool: pl, b: b, conn: conn}
	l.mu.Lock()
	refused := refusedDraining
	if !l.closed {
		refused = l.sessions.add(client, s)
	}
	l.mu.Unlock()
	if refused != "" {
		_ = conn.Close()
		rs.m.refused[refused].Inc()
		return nil
	}
	b.m().udpFlows.Inc()
	rs.m.udpSessions.Inc()
	go s.relayReplies()
	return s
}

// forget removes s from the session table.
func (l *udpListener) forget(s *udpSession) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sessions.remove(s.client, s)
}

// udpSession is one client address:port pinned to one backend.
type udpSession struct {
	l      *udpListener
	client netip.AddrPort
	rs     *ruleState
	pool   *pool // the pool this session's backend was last checked against; read loop only
	b      *backend
	conn   *net.UDPConn

	lastActive atomic.Int64
	endOnce    sync.Once
}

func (s *udpSession) touch() { s.lastActive.Store(int64(time.Since(epoch))) }

// end closes the session; its reply goroutine exits.
func (s *udpSession) end() {
	s.endOnce.Do(func() {
		s.l.forget(s)
		_ = s.conn.Close()
		s.b.m().udpFlows.Dec()
		s.rs.m.udpSessions.Dec()
	})
}

// relayReplies sends the backend's datagrams back to the client from the
// frontend socket, until the session idles out or ends.
func (s *udpSession) relayReplies() {
	defer s.end()
	rc, err := s.conn.SyscallConn()
	if err != nil {
		return
	}
	idle := s.rs.rule.IdleTimeout
	var peek [1]byte
	_ = s.conn.SetReadDeadline(time.Now().Add(idle))
	for {
		err := waitDatagram(rc, &peek)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			quiet := time.Since(epoch) - time.Duration(s.lastActive.Load())
			if quiet >= idle {
				s.rs.m.idleTimeouts.Inc()
				return
			}
			_ = s.conn.SetReadDeadline(time.Now().Add(idle - quiet))
			continue
		}
		if err != nil {
			return
		}
		bp := datagrams.Get().(*[]byte)
		n, err := s.conn.Read(*bp)
		if err == nil {
			s.touch()
			if _, werr := s.l.conn.WriteToUDPAddrPort((*bp)[:n], s.client); werr == nil {
				s.b.m().packetsOut.Inc()
				s.b.m().bytesOut.Add(float64(n))
			}
		}
		datagrams.Put(bp)
		if err != nil && !isTransientUDP(err) {
			return
		}
	}
}

// waitDatagram waits until a datagram is queued on the socket, honouring
// its read deadline, without holding a buffer.
func waitDatagram(rc syscall.RawConn, peek *[1]byte) error {
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		_, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&peek[0])), 1,
			unix.MSG_PEEK|unix.MSG_DONTWAIT|unix.MSG_TRUNC, 0, 0)
		switch errno {
		case 0:
			return true
		case unix.EAGAIN, unix.EINTR:
			return false
		case unix.ECONNREFUSED:
			// An ICMP port unreachable from the backend: the error is consumed;
			// keep waiting for real replies.
			return false
		default:
			serr = errno
			return true
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// isTransientUDP reports errors a connected UDP socket returns for an ICMP
// error from the backend; the session survives them.
func isTransientUDP(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}
