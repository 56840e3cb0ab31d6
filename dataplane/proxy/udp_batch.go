package proxy

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr: a message header and the length the kernel
// moved. Go pads it as C does on every architecture.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// udpLoop is a loop's UDP state: the batches it reads client datagrams
// into, and the queue of replies waiting for the frontend sockets. Their
// buffers are outside the Go heap, mapped lazily.
type udpLoop struct {
	// in is the batch of client datagrams last read from a port; sess the
	// session of each.
	in   [udpBatch]mmsghdr
	inIo [udpBatch]unix.Iovec
	inSA [udpBatch]unix.RawSockaddrInet6
	sess [udpBatch]*udpSession
	// fwdIo is one session's datagrams of the batch, towards its backend.
	fwdIo   [udpBatch]unix.Iovec
	fwdSess [udpBatch]*udpSession
	// out holds replies read from the sessions' sockets, each addressed to
	// its client (the session's name), until flush sends them.
	out     [udpBatch]mmsghdr
	outIo   [udpBatch]unix.Iovec
	outSess [udpBatch]*udpSession
	outN    int

	// msgs are the messages send makes of datagrams: one each, or with
	// GSO one per run of datagrams of one size to one destination. first
	// and end delimit each message's datagrams; ctl holds its UDP_SEGMENT.
	msgs       [udpBatch]mmsghdr
	first, end [udpBatch]int
	ctl        [udpBatch][4]uint64
	sent       [udpBatch]bool // by datagram, after send
	// gso is whether send may use UDP_SEGMENT; gsoFails counts its
	// failures since its last success, to give it up on a kernel without it.
	gso      bool
	gsoFails int

	mem []byte
}

// udpState returns the loop's UDP state, made on first use.
func (l *loop) udpState() *udpLoop {
	if l.udp == nil {
		l.udp = newUDPLoop()
	}
	return l.udp
}

func newUDPLoop() *udpLoop {
	u := &udpLoop{gso: udpGSO.Load()}
	mem, err := unix.Mmap(-1, 0, 2*udpBatch*maxDatagram, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		// Without the mapping, from the Go heap: the same, resident.
		mem = make([]byte, 2*udpBatch*maxDatagram)
	} else {
		u.mem = mem
	}
	for i := range udpBatch {
		u.inIo[i].Base = &mem[i*maxDatagram]
		u.in[i].hdr.Iov = &u.inIo[i]
		u.in[i].hdr.Iovlen = 1
		u.outIo[i].Base = &mem[(udpBatch+i)*maxDatagram]
		u.out[i].hdr.Iov = &u.outIo[i]
		u.out[i].hdr.Iovlen = 1
	}
	return u
}

// free unmaps the buffers; the loop has ended.
func (u *udpLoop) free() {
	if u.mem != nil {
		_ = unix.Munmap(u.mem)
		u.mem = nil
	}
}

// readClients reads one batch of client datagrams from pt and sends each
// session's share of it to its backend.
func (u *udpLoop) readClients(lp *loop, pt *udpPort) {
	for i := range udpBatch {
		m := &u.in[i].hdr
		m.Name = (*byte)(unsafe.Pointer(&u.inSA[i]))
		m.Namelen = unix.SizeofSockaddrInet6
		m.Flags = 0
		u.inIo[i].Len = maxDatagram
	}
	n, err := sysRecvmmsg(pt.fd, u.in[:])
	if err != nil || n == 0 {
		return // EAGAIN: drained; anything else is the socket's to report again
	}
	rs := pt.l.rule.Load()
	pl := rs.pool.Load()
	for i := range n {
		u.sess[i] = nil
		m := &u.in[i]
		if m.hdr.Flags&unix.MSG_TRUNC != 0 {
			continue // cannot happen (maxDatagram); never forward a part of a datagram
		}
		client := addrPortOf((*unix.RawSockaddrAny)(unsafe.Pointer(&u.inSA[i])))
		s := pt.sessions[client]
		if s != nil && s.pool != pl {
			// The pool changed since this session last looked: it keeps its
			// backend only if that backend is still in the pool and not probed down.
			if pl.isAlive(s.b) {
				s.pool = pl
			} else {
				s.end(lp)
				s = nil
			}
		}
		if s == nil {
			if s = pt.newSession(lp, rs, pl, client, &u.inSA[i], m.hdr.Namelen); s == nil {
				continue
			}
		}
		s.lastActive = lp.now
		u.sess[i] = s
	}
	// Each session's datagrams, in the order they came, in one system call.
	for i := range n {
		s := u.sess[i]
		if s == nil {
			continue
		}
		k := 0
		for j := i; j < n; j++ {
			if u.sess[j] != s {
				continue
			}
			u.sess[j] = nil
			u.fwdIo[k].Base = u.inIo[j].Base
			u.fwdIo[k].Len = uint64(u.in[j].n)
			k++
		}
		u.forward(s, k)
	}
}

// forward sends the first k datagrams of u.fwdIo on s's socket.
func (u *udpLoop) forward(s *udpSession, k int) {
	for i := range k {
		u.fwdSess[i] = s
	}
	u.send(s.fd, u.fwdIo[:k], u.fwdSess[:k], false)
	packets, bytes := 0, 0
	for i := range k {
		if u.sent[i] {
			packets++
			bytes += int(u.fwdIo[i].Len)
		}
	}
	clear(u.fwdSess[:k])
	if packets > 0 {
		m := s.b.m()
		m.packetsIn.Add(float64(packets))
		m.bytesIn.Add(float64(bytes))
	}
}

// readReplies reads the replies queued on s's socket into the out queue.
func (u *udpLoop) readReplies(lp *loop, s *udpSession) {
	if u.outN == udpBatch {
		u.flush()
	}
	start := u.outN
	for i := start; i < udpBatch; i++ {
		m := &u.out[i].hdr
		m.Name = nil
		m.Namelen = 0
		m.Flags = 0
		u.outIo[i].Len = maxDatagram
	}
	n, err := sysRecvmmsg(s.fd, u.out[start:])
	if err == unix.ECONNREFUSED {
		// An ICMP port unreachable from the backend: the error is
		// consumed; the session waits for real replies.
		n, err = sysRecvmmsg(s.fd, u.out[start:])
	}
	switch err {
	case nil:
	case unix.EAGAIN, unix.EINTR, unix.ECONNREFUSED:
		return
	default:
		s.end(lp)
		return
	}
	kept := start
	for i := start; i < start+n; i++ {
		if u.out[i].hdr.Flags&unix.MSG_TRUNC != 0 {
			continue // cannot happen (maxDatagram); never send a part of a datagram
		}
		if i != kept {
			u.outIo[i].Base, u.outIo[kept].Base = u.outIo[kept].Base, u.outIo[i].Base
			u.out[kept].n = u.out[i].n
		}
		m := &u.out[kept]
		u.outIo[kept].Len = uint64(m.n)
		m.hdr.Name = (*byte)(unsafe.Pointer(&s.name))
		m.hdr.Namelen = s.namelen
		u.outSess[kept] = s
		kept++
	}
	u.outN = kept
	if kept > start {
		s.lastActive = lp.now
	}
}

// flush sends the queued replies, each from its session's frontend socket.
func (u *udpLoop) flush() {
	for i := 0; i < u.outN; {
		fd := u.outSess[i].port.fd
		j := i + 1
		for j < u.outN && u.outSess[j].port.fd == fd {
			j++
		}
		u.send(fd, u.outIo[i:j], u.outSess[i:j], true)
		u.count(i, j)
		i = j
	}
	clear(u.outSess[:u.outN])
	u.outN = 0
}

// count adds the replies out[from:to] that send sent (u.sent, indexed from
// from) to their backends' metrics.
func (u *udpLoop) count(from, to int) {
	for i := from; i < to; {
		s := u.outSess[i]
		packets, bytes := 0, 0
		for ; i < to && u.outSess[i] == s; i++ {
			if u.sent[i-from] {
				packets++
				bytes += int(u.out[i].n)
			}
		}
		if packets > 0 {
			m := s.b.m()
			m.packetsOut.Add(float64(packets))
			m.bytesOut.Add(float64(bytes))
		}
	}
}

// udpGSO is whether loops send runs of same-sized datagrams to one
// destination as one message with UDP_SEGMENT (generic segmentation
// offload): the kernel routes and queues them once and cuts them into
// the same datagrams only on the way out, or on delivery on this host.
var udpGSO = func() (b atomic.Bool) { b.Store(true); return }()

const (
	// udpMaxSegments is the kernel's limit of segments per GSO message.
	udpMaxSegments = 64
	// gsoMaxBytes keeps a GSO message under UDP's 64 KiB length limit.
	gsoMaxBytes = 60000
	// gsoGiveUp is how many failed GSO messages in a row, with no success
	// in between, make a loop stop trying.
	gsoGiveUp = 16
)

// send sends each datagram dg[i] on fd: to sess[i]'s client when named,
// else to where fd is connected. It records which were sent in u.sent
// (by index in dg). A datagram the network cannot take now is dropped, as
// a network would; ECONNREFUSED (an ICMP error from a connected peer,
// consumed by the call that reports it) is retried once.
func (u *udpLoop) send(fd int, dg []unix.Iovec, sess []*udpSession, named bool) {
	n := len(dg)
	clear(u.sent[:n])
	refused := false
	noGSO := 0 // datagrams before this index go one per message
	for d := 0; d < n; {
		// Plan the messages for dg[d:].
		m := 0
		for i := d; i < n; m++ {
			j := i + 1
			if u.gso && i >= noGSO && dg[i].Len > 0 {
				// An empty datagram is never a segment: it would vanish.
				size, total := dg[i].Len, dg[i].Len
				for j < n && j-i < udpMaxSegments && sess[j] == sess[i] && dg[j].Len > 0 && dg[j].Len <= size && total+dg[j].Len <= gsoMaxBytes {
					total += dg[j].Len
					j++
					if dg[j-1].Len < size {
						break // only the last segment may be shorter
					}
				}
			}
			h := &u.msgs[m].hdr
			h.Iov = &dg[i]
			h.SetIovlen(j - i)
			h.Name, h.Namelen = nil, 0
			if named {
				h.Name, h.Namelen = (*byte)(unsafe.Pointer(&sess[i].name)), sess[i].namelen
			}
			h.Control, h.Controllen = nil, 0
			if j-i > 1 {
				c := &u.ctl[m]
				ch := (*unix.Cmsghdr)(unsafe.Pointer(c))
				ch.Level, ch.Type = unix.SOL_UDP, unix.UDP_SEGMENT
				ch.SetLen(unix.CmsgLen(2))
				*(*uint16)(unsafe.Add(unsafe.Pointer(c), unix.CmsgLen(0))) = uint16(dg[i].Len)
				h.Control = (*byte)(unsafe.Pointer(c))
				h.SetControllen(unix.CmsgSpace(2))
			}
			h.Flags = 0
			u.first[m], u.end[m] = i, j
			i = j
		}
		// Send them.
		replan := false
		for k := 0; k < m && !replan; {
			c, err := sysSendmmsg(fd, u.msgs[k:m])
			switch {
			case err == nil:
				for x := k; x < k+c; x++ {
					for i := u.first[x]; i < u.end[x]; i++ {
						u.sent[i] = true
					}
					if u.end[x]-u.first[x] > 1 {
						u.gsoFails = 0
					}
				}
				k += c
			case err == unix.ECONNREFUSED && !refused:
				refused = true
			case err == unix.EAGAIN || err == unix.ENOBUFS:
				return // the socket's buffer is full
			case u.end[k]-u.first[k] > 1:
				// The kernel would not segment this one (no GSO, or a path
				// that cannot take it): its datagrams go one by one.
				if u.gsoFails++; u.gsoFails >= gsoGiveUp {
					u.gso = false
				}
				d, noGSO, replan = u.first[k], u.end[k], true
			default:
				k++ // this datagram cannot go (its address?); the next may
			}
			if !replan && k == m {
				d = n
			}
		}
	}
}

func sysRecvmmsg(fd int, msgs []mmsghdr) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func sysSendmmsg(fd int, msgs []mmsghdr) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(len(msgs)), unix.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// sysUDPSocket opens a non-blocking UDP socket.
func sysUDPSocket(family int) (int, error) {
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}
