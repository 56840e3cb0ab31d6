package proxy

import (
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// UDP runs on the event loops, as TCP does. A UDP listener has one socket
// per loop, all bound to the frontend with SO_REUSEPORT: the kernel hashes
// each datagram's addresses and ports to one of them, so a client
// address:port always reaches the same loop, and that loop alone holds its
// session. A session is a connected socket towards the client's backend,
// registered with the same loop. Client datagrams are read in batches
// (recvmmsg) and go to each session's backend in one system call per
// session and batch (sendmmsg); replies are read in batches from the
// sessions' sockets and leave the frontend socket together, whatever their
// clients, once the loop has handled its ready sockets (sendmmsg). No lock
// is taken per datagram: the session caps' table is locked only when a
// session starts or ends.

// maxDatagram is the size of every buffer a datagram is read into: larger
// than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6), so no
// datagram is ever truncated. The buffers are mapped lazily: a page costs
// memory only once a datagram that long has used it.
const maxDatagram = 64 << 10

// udpReceiveBuffer is the receive buffer asked for each frontend socket.
const udpReceiveBuffer = 1 << 20

// udpBatch is the most datagrams one recvmmsg or sendmmsg moves.
const udpBatch = 32

// udpListener serves one rule's UDP frontend: a session per client
// address:port, each with its own connected socket to its backend.
type udpListener struct {
	p     *Proxy
	local netip.AddrPort
	rule  atomic.Pointer[ruleState]
	start sync.Once
	ports []*udpPort // one per loop

	mu       sync.Mutex // guards sessions and closed; never taken per datagram
	sessions sessionTable[*udpSession]
	closed   bool
}

// udpPort is a UDP listener's socket on one loop, with the sessions of the
// clients the kernel steers to it. Only its loop touches it.
type udpPort struct {
	l        *udpListener
	lp       *loop
	fd       int
	sessions map[netip.AddrPort]*udpSession
	shut     bool
}

func (p *Proxy) listenUDP(k snapshot.ListenerKey) (listener, error) {
	loops, err := p.tcpLoops()
	if err != nil {
		return nil, err
	}
	l := &udpListener{p: p, local: k.Addr}
	l.sessions.init(p.opts.MaxUDPSessions, p.opts.MaxUDPSessionsPerClient)
	for _, lp := range loops {
		fd, err := udpListenSocket(k.Addr, len(loops) > 1)
		if err != nil {
			for _, pt := range l.ports {
				sysClose(pt.fd)
			}
			return nil, err
		}
		l.ports = append(l.ports, &udpPort{l: l, lp: lp, fd: fd, sessions: map[netip.AddrPort]*udpSession{}})
	}
	return l, nil
}

// udpListenSocket opens a non-blocking UDP socket bound to a; with
// reusePort, one of a group that shares a's datagrams. An IPv4 address
// listens on IPv4 only; "::" on both families, as Go's net does.
func udpListenSocket(a netip.AddrPort, reusePort bool) (int, error) {
	family, sa := sockaddr(a)
	opErr := func(call string, err error) error {
		return &net.OpError{Op: "listen", Net: "udp", Addr: net.UDPAddrFromAddrPort(a), Err: os.NewSyscallError(call, err)}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, opErr("socket", err)
	}
	setup := func() error {
		if reusePort {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
				return opErr("setsockopt", err)
			}
		}
		// Room for a burst from many clients (1 MiB, as far as
		// net.core.rmem_max allows): past it the kernel drops datagrams.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, udpReceiveBuffer)
		if family == unix.AF_INET6 {
			v6only := 1
			if a.Addr().IsUnspecified() {
				v6only = 0
			}
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
				return opErr("setsockopt", err)
			}
		}
		if err := unix.Bind(fd, sa); err != nil {
			return opErr("bind", err)
		}
		return nil
	}
	if err := setup(); err != nil {
		_ = unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func (l *udpListener) serve(rs *ruleState) {
	l.rule.Store(rs)
	l.start.Do(func() {
		for _, pt := range l.ports {
			pt.lp.do(func() {
				if pt.shut {
					return
				}
				if err := pt.lp.register(pt.fd, unix.EPOLLIN, pt); err != nil {
					l.p.log.Error(err, "cannot watch UDP listener", "listener", l.local.String())
				}
			})
		}
	})
}

// close ends every session and closes the sockets, on their loops.
func (l *udpListener) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	for _, pt := range l.ports {
		pt.lp.do(func() { pt.close(pt.lp) })
	}
}

func (pt *udpPort) close(lp *loop) {
	if pt.shut {
		return
	}
	pt.shut = true
	if u := lp.udp; u != nil {
		u.flush() // queued replies leave before their socket closes
	}
	for _, s := range pt.sessions {
		s.end(lp)
	}
	lp.closeFD(pt.fd)
}

// event reads a batch of client datagrams and forwards them.
func (pt *udpPort) event(lp *loop, fd int, _ uint32) {
	if !pt.shut {
		lp.udpState().readClients(lp, pt)
	}
}

// newSession picks the client's backend and opens a connected socket to it,
// within the session caps; nil means the datagram is dropped.
func (pt *udpPort) newSession(lp *loop, rs *ruleState, pl *pool, client netip.AddrPort, name *unix.RawSockaddrInet6, namelen uint32) *udpSession {
	l := pt.l
	var buf [1]*backend
	picked := l.p.choose(rs, buf[:0], flowHash(rs.rule, client, l.local, snapshot.UDP), client.Addr().Unmap(), 1)
	if len(picked) == 0 {
		rs.m.refused[refusedNoBackend].Inc()
		return nil
	}
	b := picked[0]
	fd, err := sysUDPSocket(b.family())
	if err == nil {
		if err = b.connect(fd); err != nil {
			sysClose(fd)
		}
	}
	if err != nil {
		b.m().dialFailures.Inc()
		return nil
	}
	s := &udpSession{port: pt, client: client, name: *name, namelen: namelen, rs: rs, pool: pl, b: b, fd: fd, lastActive: lp.now}
	s.timer = timer{index: -1, owner: s}
	l.mu.Lock()
	refused := refusedDraining
	switch {
	case l.closed:
	case l.sessions.get(client) != nil:
		// Another loop holds this client: only while a reuseport group
		// forms can the kernel steer one client to two sockets.
		refused = "elsewhere"
	default:
		refused = l.sessions.add(client, s)
	}
	l.mu.Unlock()
	if refused != "" {
		sysClose(fd)
		if refused != "elsewhere" {
			rs.m.refused[refused].Inc()
		}
		return nil
	}
	if err := lp.register(fd, unix.EPOLLIN, s); err != nil {
		sysClose(fd)
		l.mu.Lock()
		l.sessions.remove(client, s)
		l.mu.Unlock()
		b.m().dialFailures.Inc()
		return nil
	}
	pt.sessions[client] = s
	lp.timers.set(&s.timer, lp.now+s.rs.rule.IdleTimeout)
	b.m().udpFlows.Inc()
	rs.m.udpSessions.Inc()
	return s
}

// udpSession is one client address:port pinned to one backend. Only its
// port's loop touches it.
type udpSession struct {
	port   *udpPort
	client netip.AddrPort
	// name is the client's address as the kernel gave it, where replies go.
	name    unix.RawSockaddrInet6
	namelen uint32
	rs      *ruleState
	pool    *pool // the pool this session's backend was last checked against
	b       *backend
	fd      int // connected to the backend

	lastActive time.Duration // since epoch, as the loop's clock
	timer      timer
	ended      bool
}

// end closes the session.
func (s *udpSession) end(lp *loop) {
	if s.ended {
		return
	}
	s.ended = true
	lp.timers.cancel(&s.timer)
	lp.closeFD(s.fd)
	pt := s.port
	if pt.sessions[s.client] == s {
		delete(pt.sessions, s.client)
	}
	l := pt.l
	l.mu.Lock()
	l.sessions.remove(s.client, s)
	l.mu.Unlock()
	s.b.m().udpFlows.Dec()
	s.rs.m.udpSessions.Dec()
}

// expire ends the session once it has been idle for the rule's idle timeout.
func (s *udpSession) expire(lp *loop) {
	idle := s.rs.rule.IdleTimeout
	if lp.now-s.lastActive >= idle {
		s.rs.m.idleTimeouts.Inc()
		s.end(lp)
		return
	}
	lp.timers.set(&s.timer, s.lastActive+idle)
}

// event reads the backend's replies into the loop's queue for the frontend.
func (s *udpSession) event(lp *loop, _ int, _ uint32) {
	if !s.ended {
		lp.udpState().readReplies(lp, s)
	}
}
