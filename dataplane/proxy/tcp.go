package proxy

import (
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/maglev"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// tcpLoops returns the proxy's event loops, starting them on first use: one
// per CPU the Go scheduler may use. Called with p.mu held.
func (p *Proxy) tcpLoops() ([]*loop, error) {
	if p.loops != nil {
		return p.loops, nil
	}
	n := p.opts.loops
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	loops := make([]*loop, 0, n)
	for range n {
		l, err := newLoop(p)
		if err != nil {
			for _, l := range loops {
				l.stop()
			}
			return nil, err
		}
		loops = append(loops, l)
	}
	p.loops = loops
	return loops, nil
}

// tcpListener is one listening socket, registered with every loop: the
// kernel wakes one of them per new connection (EPOLLEXCLUSIVE), and the
// connection lives on that loop.
type tcpListener struct {
	p         *Proxy
	fd        int
	local     netip.AddrPort
	rule      atomic.Pointer[ruleState]
	start     sync.Once
	loops     []*loop
	acceptors []*acceptor // by loop
}

// acceptor is a listener as one loop sees it.
type acceptor struct {
	ln      *tcpListener
	backoff time.Duration
	timer   timer // re-registers the listener after an accept error
	closed  bool
}

func (p *Proxy) listenTCP(k snapshot.ListenerKey) (listener, error) {
	if _, err := p.tcpLoops(); err != nil {
		return nil, err
	}
	fd, err := listenSocket(k.Addr, p.clientCC.listen)
	if err != nil {
		return nil, err
	}
	return &tcpListener{p: p, fd: fd, local: k.Addr, loops: p.loops}, nil
}

// listenSocket opens a non-blocking listening socket on a. An IPv4 address
// listens on IPv4 only; "::" listens on both families, as Go's net does.
// Accepted sockets inherit the listener's congestion control cc.
func listenSocket(a netip.AddrPort, cc congestion) (int, error) {
	family, sa := sockaddr(a)
	opErr := func(call string, err error) error {
		return &net.OpError{Op: "listen", Net: "tcp", Addr: net.TCPAddrFromAddrPort(a), Err: os.NewSyscallError(call, err)}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, opErr("socket", err)
	}
	setup := func() error {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return opErr("setsockopt", err)
		}
		if family == unix.AF_INET6 {
			v6only := 1
			if a.Addr().IsUnspecified() {
				v6only = 0
			}
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
				return opErr("setsockopt", err)
			}
		}
		// Accepted sockets inherit TCP_NODELAY from the listener: small
		// messages leave at once, and each connection saves a system call.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			return opErr("setsockopt", err)
		}
		cc.apply(fd)
		if err := unix.Bind(fd, sa); err != nil {
			return opErr("bind", err)
		}
		// The kernel caps the backlog at net.core.somaxconn.
		if err := unix.Listen(fd, 1<<16-1); err != nil {
			return opErr("listen", err)
		}
		return nil
	}
	if err := setup(); err != nil {
		_ = unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func (l *tcpListener) serve(rs *ruleState) {
	l.rule.Store(rs)
	l.start.Do(func() {
		for _, lp := range l.loops {
			a := &acceptor{ln: l}
			a.timer = timer{index: -1, owner: a}
			l.acceptors = append(l.acceptors, a)
			lp.do(func() { a.register(lp) })
		}
	})
}

// close stops accepting: every loop lets go of the socket, then it is
// closed. Established flows are not affected.
func (l *tcpListener) close() {
	for i, a := range l.acceptors {
		lp := l.loops[i]
		lp.do(func() {
			a.closed = true
			lp.timers.cancel(&a.timer)
			_ = unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_DEL, l.fd, nil)
			lp.forget(l.fd)
		})
	}
	_ = unix.Close(l.fd)
}

func (a *acceptor) register(lp *loop) {
	if err := lp.register(a.ln.fd, unix.EPOLLIN|unix.EPOLLEXCLUSIVE, a); err != nil {
		a.ln.p.log.Error(err, "cannot watch listener", "listener", a.ln.local.String())
	}
}

// acceptBatch bounds the connections one wake-up accepts, so a busy listener
// does not starve established flows.
const acceptBatch = 64

func (a *acceptor) event(lp *loop, fd int, _ uint32) {
	for range acceptBatch {
		cfd, client, err := accept(fd)
		switch err {
		case nil:
		case unix.EAGAIN:
			a.backoff = 0
			return
		case unix.EINTR, unix.ECONNABORTED:
			continue
		default:
			// Out of file descriptors or similar: stop watching the listener
			// for a while rather than spin, and keep serving the flows we have.
			a.backoff = min(max(2*a.backoff, 5*time.Millisecond), time.Second)
			a.ln.p.log.Error(err, "accept", "listener", a.ln.local.String(), "retryIn", a.backoff)
			_ = unix.EpollCtl(lp.epfd, unix.EPOLL_CTL_DEL, fd, nil)
			lp.forget(fd)
			lp.timers.set(&a.timer, lp.now+a.backoff)
			return
		}
		ln, to := a.ln, pickLoop(lp, a.ln.loops)
		to.load.Add(1)
		if to == lp {
			lp.p.acceptTCP(lp, ln, cfd, client)
		} else {
			to.post(func() { to.p.acceptTCP(to, ln, cfd, client) })
		}
	}
}

// expire ends an accept back-off.
func (a *acceptor) expire(lp *loop) {
	if !a.closed {
		a.register(lp)
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

// resetOnClose makes closing fd send a RST (SO_LINGER 0) instead of a FIN.
func resetOnClose(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
}

// resetAndClose closes a socket with a RST.
func resetAndClose(fd int) {
	resetOnClose(fd)
	sysClose(fd)
}

// pickLoop chooses the loop a new connection will live on: the accepting
// one, unless another carries clearly fewer flows. Whichever loop the kernel
// wakes accepts everything queued, so without this a burst of connections
// (eight bulk streams opening together) could all land on one CPU.
func pickLoop(lp *loop, loops []*loop) *loop {
	best, mine := lp, lp.load.Load()
	least := mine
	for _, o := range loops {
		if n := o.load.Load(); n < least {
			best, least = o, n
		}
	}
	if mine-least >= max(1, mine/4) {
		return best
	}
	return lp
}

// acceptTCP admits a new connection on lp and starts dialing its backend,
// or refuses it with a reset so the client learns at once. lp.load already
// counts it.
func (p *Proxy) acceptTCP(lp *loop, ln *tcpListener, cfd int, client netip.AddrPort) {
	rs := ln.rule.Load()
	ip := client.Addr().Unmap()
	var counted, acquired bool
	refuse := func(reason string) {
		rs.m.refused[reason].Inc()
		resetAndClose(cfd)
		if acquired {
			p.clients.release(ip)
		}
		if counted {
			p.tcpConns.Add(-1)
		}
		lp.load.Add(-1)
	}
	if p.shutdown.Load() {
		refuse(refusedDraining)
		return
	}
	if p.tcpConns.Add(1) > int64(p.opts.MaxConnections) {
		p.tcpConns.Add(-1)
		refuse(refusedGlobalLimit)
		return
	}
	counted = true
	if !p.clients.acquire(ip, p.opts.MaxConnectionsPerClient) {
		refuse(refusedClientLimit)
		return
	}
	acquired = true
	f := &tcpFlow{p: p, rs: rs, clientIP: ip, cfd: cfd, bfd: -1, ccPending: p.clientCC.far != nil, pp: newProxied(rs.rule, ln, cfd, client)}
	f.timer = timer{index: -1, owner: f}
	f.ncand = uint8(len(p.choose(rs, f.cands[:0], flowHash(rs.rule, client, ln.local, snapshot.TCP), ip, maxDialAttempts)))
	if f.ncand == 0 {
		refuse(refusedNoBackend)
		return
	}
	if err := lp.register(cfd, flowEvents, f); err != nil {
		refuse(refusedDialFailed)
		return
	}
	lp.flows.add(f)
	f.dial(lp)
}

// flowEvents is what a flow's sockets are watched for, once, edge-triggered.
const flowEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// tcpFlow is one proxied connection: a client socket and a backend socket,
// owned by one loop. While idle it holds no buffer, no pipe and no goroutine.
type tcpFlow struct {
	p        *Proxy
	rs       *ruleState
	clientIP netip.Addr
	cfd, bfd int

	// Dialing: the client's Maglev preference order, and the attempt in flight.
	cands        [maxDialAttempts]*backend
	ncand, tried uint8
	b            *backend // the backend being dialed, then the one connected
	pp           *proxied // the PROXY protocol header not yet sent; nil for most rules
	established  bool
	closing      bool // close once the copiers are done
	abort        atomic.Bool
	up, down     half // client to backend, backend to client
	lastActive   time.Duration
	timer        timer // dial timeout, then idle timeout
	next, prev   *tcpFlow
	closed       bool
	// ccPending: the client may be far, and its socket may yet switch to
	// the frontend side's congestion control; toClient counts the bytes
	// sent to it until that is settled.
	ccPending bool
	toClient  int32
}

// half is one direction of a flow.
type half struct {
	src, dst int
	bytes    prometheus.Counter

	readable bool // src signalled data (or its end) that we have not read
	hup      bool // src's peer has shut down: read to the end even after a short read
	eof      bool // src ended
	shut     bool // dst has been shut down for writing
	bulk     bool // the last read filled the buffer: splice the rest
	busy     bool // a copier goroutine owns src, dst, pipe and inPipe
	cs       *copyState

	pend    []byte  // read but not yet written: dst is full
	pendBuf *[]byte // the pooled buffer pend points into
	pipe    *pipe   // holds inPipe spliced bytes dst has not taken
	inPipe  int
}

// dial connects to the next candidate, or refuses the client when none is left.
func (f *tcpFlow) dial(lp *loop) {
	for f.tried < f.ncand {
		b := f.cands[f.tried]
		fd, err := connectSocket(b, f.p.backendCC)
		if err == nil {
			if err = lp.register(fd, flowEvents, f); err == nil {
				f.b, f.bfd = b, fd
				lp.timers.set(&f.timer, lp.now+f.p.opts.DialTimeout)
				return
			}
			sysClose(fd)
		}
		f.dialFailed(b)
	}
	f.rs.m.refused[refusedDialFailed].Inc()
	resetOnClose(f.cfd)
	f.close(lp)
}

func (f *tcpFlow) dialFailed(b *backend) {
	b.m().dialFailures.Inc()
	f.tried++
	if f.tried < f.ncand {
		f.rs.m.dialRetries.Inc()
	}
}

// connectSocket starts a non-blocking connection to b with congestion
// control cc; the loop learns of its outcome from epoll.
func connectSocket(b *backend, cc congestion) (int, error) {
	fd, err := sysTCPSocket(b.family())
	if err != nil {
		return -1, err
	}
	cc.apply(fd)
	if err := b.connect(fd); err != nil && err != unix.EINPROGRESS {
		sysClose(fd)
		return -1, err
	}
	return fd, nil
}

// retryDial abandons the backend being dialed and tries the next one.
func (f *tcpFlow) retryDial(lp *loop) {
	lp.closeFD(f.bfd)
	f.bfd = -1
	f.dialFailed(f.b)
	f.dial(lp)
}

// connected starts copying once the backend accepted, after the PROXY
// protocol header if the rule sends one.
func (f *tcpFlow) connected(lp *loop) {
	var hdr headerResult
	if f.pp != nil {
		var ok bool
		if hdr, ok = f.sendHeader(lp); !ok {
			return
		}
	}
	f.established = true
	f.up = half{src: f.cfd, dst: f.bfd, bytes: f.b.m().bytesIn, readable: f.up.readable, hup: f.up.hup}
	f.down = half{src: f.bfd, dst: f.cfd, bytes: f.b.m().bytesOut, readable: f.down.readable, hup: f.down.hup}
	f.b.m().syn.Inc()
	f.b.m().tcpFlows.Inc()
	f.lastActive = lp.now
	lp.timers.set(&f.timer, lp.now+f.rs.rule.IdleTimeout)
	if f.pp != nil {
		f.up.bytes.Add(float64(hdr.read))
		f.up.eof = hdr.eof
		if len(hdr.rest) > 0 {
			f.up.pend = hdr.rest
			f.up.keep()
		}
		f.pp.release()
		f.pp = nil
	}
	if f.pump(lp, &f.up) {
		f.pump(lp, &f.down)
	}
}

func (f *tcpFlow) event(lp *loop, fd int, ev uint32) {
	if f.closing {
		return // waiting for a copier before closing
	}
	in, out := &f.up, &f.down // fd is in's source and out's destination
	if fd != f.cfd {
		in, out = &f.down, &f.up
	}
	if in.busy && ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		in.signal()
	}
	if out.busy && ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		out.signal()
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		in.readable = true
		if ev&(unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
			in.hup = true
		}
	}
	if !f.established {
		switch {
		case fd == f.cfd:
			if ev&unix.EPOLLERR != 0 {
				f.close(lp) // the client reset before we reached a backend
			}
		case ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0:
			f.retryDial(lp)
		case ev&unix.EPOLLOUT != 0:
			f.connected(lp)
		}
		return
	}
	if ev&unix.EPOLLERR != 0 {
		f.close(lp)
		return
	}
	if in.readable && !f.pump(lp, in) {
		return
	}
	if ev&unix.EPOLLOUT != 0 && !out.busy && (out.inPipe > 0 || len(out.pend) > 0) {
		f.pump(lp, out)
	}
}

// copyBuffers hold what a full destination has not taken yet.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, copyBufferSize); return &b }}

// copyBufferSize is what one read moves; a read that fills it means a bulk
// transfer, which continues with splice(2).
const copyBufferSize = 16 << 10

// pumpBudget bounds what one pump moves before the loop serves its other
// flows: about 2 ms of one bulk stream. Smaller budgets cost throughput in
// make bench (1 MiB: about 4% less); larger ones only delay the others.
const pumpBudget = 4 << 20

// pending is a direction that still had data when its pump ran out of budget.
type pending struct {
	f *tcpFlow
	h *half
}

// pump moves what it can of one direction: first what dst did not take last
// time, then whatever src has. It stops when src is drained or dst is full
// (epoll says when either changes), and reports whether the flow is still
// open.
//
// Small messages go through the loop's one read buffer: one read and one
// write each. A read that fills the buffer switches the direction to
// splice(2) through a pipe, so bulk data stays in the kernel; the pipe goes
// back to the loop as soon as it is empty, so a quiet flow holds none.
func (f *tcpFlow) pump(lp *loop, h *half) bool {
	if f.closing {
		return false
	}
	if h.busy {
		return true // a copier has it and hands it back when done
	}
	if !h.flush() {
		return f.close(lp)
	}
	if h.inPipe > 0 || len(h.pend) > 0 {
		return true // dst is full; its EPOLLOUT resumes us
	}
	moved := 0
	for h.readable && !h.eof {
		if h.bulk && h.pipe != nil && moved >= f.p.opts.offloadAfter {
			// A long transfer: a copier goroutine takes it over.
			f.offload(lp, h)
			return true
		}
		if moved >= pumpBudget {
			// Let the loop's other flows have a turn; it comes back to us.
			lp.again = append(lp.again, pending{f, h})
			break
		}
		var n int
		var err error
		if h.bulk {
			if h.pipe == nil {
				if h.pipe = lp.getPipe(); h.pipe == nil {
					h.bulk = false
					continue
				}
			}
			n, err = sysSplice(h.src, h.pipe.w, pipeSize)
		} else {
			n, err = sysRead(h.src, lp.scratch)
		}
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			h.readable = false
			h.bulk = h.bulk && moved >= copyBufferSize
			continue
		case err != nil:
			return f.close(lp)
		case n == 0:
			h.eof = true
			continue
		}
		moved += n
		f.lastActive = lp.now
		h.bytes.Add(float64(n))
		if f.ccPending && h == &f.down {
			if f.toClient += int32(n); f.toClient >= clientSettleBytes {
				f.settleCongestion()
			}
		}
		if h.bulk {
			h.inPipe = n
		} else {
			h.pend = lp.scratch[:n]
		}
		if !h.flush() {
			return f.close(lp)
		}
		if h.inPipe > 0 || len(h.pend) > 0 {
			h.keep()
			return true
		}
		if !h.bulk {
			if n == len(lp.scratch) {
				h.bulk = true
			} else if !h.hup {
				h.readable = false // a short read drained the socket
			}
		}
	}
	if h.pipe != nil {
		lp.putPipe(h.pipe)
		h.pipe = nil
	}
	if h.eof && !h.shut {
		h.shut = true
		if f.up.shut && f.down.shut {
			// Both ways are done: close sends the last FIN.
			return f.close(lp)
		}
		sysShutdownWrite(h.dst)
	}
	return true
}

// flush writes what dst has not taken yet; false means a write error.
func (h *half) flush() bool {
	for h.inPipe > 0 {
		n, err := sysSplice(h.pipe.r, h.dst, h.inPipe)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return true
		}
		if err != nil {
			return false
		}
		h.inPipe -= n
	}
	for len(h.pend) > 0 {
		n, err := sysWrite(h.dst, h.pend)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return true
		}
		if err != nil {
			return false
		}
		h.pend = h.pend[n:]
	}
	if h.pendBuf != nil {
		copyBuffers.Put(h.pendBuf)
		h.pendBuf, h.pend = nil, nil
	}
	return true
}

// keep moves unwritten bytes out of the loop's read buffer into one of the
// flow's own, until dst takes them.
func (h *half) keep() {
	if len(h.pend) == 0 || h.pendBuf != nil {
		return
	}
	bp := copyBuffers.Get().(*[]byte)
	h.pend = (*bp)[:copy(*bp, h.pend)]
	h.pendBuf = bp
}

// expire is the flow's deadline: the dial timeout while dialing, then the
// idle timeout, checked lazily against the last transfer.
func (f *tcpFlow) expire(lp *loop) {
	if !f.established {
		f.retryDial(lp)
		return
	}
	idle := f.rs.rule.IdleTimeout
	for _, h := range []*half{&f.up, &f.down} {
		if h.cs != nil {
			if a := time.Duration(h.cs.active.Load()); a > f.lastActive {
				f.lastActive = a
			}
		}
	}
	if quiet := lp.now - f.lastActive; quiet < idle {
		lp.timers.set(&f.timer, f.lastActive+idle)
		return
	}
	f.rs.m.idleTimeouts.Inc()
	if f.rs.rule.TCPReset {
		// Both sides learn at once that the flow is gone.
		resetOnClose(f.cfd)
		resetOnClose(f.bfd)
	}
	f.close(lp)
}

// close ends the flow and releases everything it holds. It returns false,
// for pump's callers.
func (f *tcpFlow) close(lp *loop) bool {
	if f.closed {
		return false
	}
	if f.up.busy || f.down.busy {
		// A copier is using the sockets: close when it hands them back.
		f.closing = true
		f.abort.Store(true)
		for _, h := range []*half{&f.up, &f.down} {
			if h.busy {
				h.signal()
			}
		}
		return false
	}
	f.closed = true
	f.pp.release()
	lp.timers.cancel(&f.timer)
	lp.flows.remove(f)
	if f.established {
		f.countPackets()
		f.b.m().tcpFlows.Dec()
	}
	for _, h := range []*half{&f.up, &f.down} {
		if h.pendBuf != nil {
			copyBuffers.Put(h.pendBuf)
			h.pendBuf, h.pend = nil, nil
		}
		if h.pipe != nil {
			// Bytes still in the pipe are lost with the flow; so is the pipe.
			if h.inPipe > 0 {
				h.pipe.close()
			} else {
				lp.putPipe(h.pipe)
			}
			h.pipe = nil
		}
	}
	lp.closeFD(f.cfd)
	if f.bfd >= 0 {
		lp.closeFD(f.bfd)
	}
	f.p.clients.release(f.clientIP)
	f.p.tcpConns.Add(-1)
	lp.load.Add(-1)
	return false
}

// settleCongestion keeps a near client on the listener's congestion control
// and switches a far one to the frontend side's, once the flow has shown it
// carries data to the client.
func (f *tcpFlow) settleCongestion() {
	f.ccPending = false
	if rtt, ok := sysTCPMinRTT(f.cfd); ok && rtt < f.p.clientCC.nearRTT {
		f.p.metrics.bulkClients[clientNear].Inc()
		return
	}
	_ = setCongestion(f.cfd, f.p.clientCC.far)
	f.p.metrics.bulkClients[clientFar].Inc()
}

// countPackets adds the flow's packets at the frontend, as the kernel counted
// them on the client's socket: segments from the client (in) and to it (out),
// acknowledgements and retransmissions included. One TCP_INFO read per
// connection.
func (f *tcpFlow) countPackets() {
	if in, out, ok := sysTCPSegments(f.cfd); ok {
		f.b.m().packetsIn.Add(float64(in))
		f.b.m().packetsOut.Add(float64(out))
	}
}

// sockaddr converts an address for the socket calls.
func sockaddr(a netip.AddrPort) (family int, sa unix.Sockaddr) {
	ip := a.Addr()
	if ip.Is4() || ip.Is4In6() {
		return unix.AF_INET, &unix.SockaddrInet4{Port: int(a.Port()), Addr: ip.Unmap().As4()}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Port: int(a.Port()), Addr: ip.As16()}
}
