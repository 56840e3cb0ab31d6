package proxy

import (
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
	// fwd is one session's datagrams of the batch, towards its backend.
	fwd   [udpBatch]mmsghdr
	fwdIo [udpBatch]unix.Iovec
	// out holds replies read from the sessions' sockets, each addressed to
	// its client (the session's name), until flush sends them.
	out     [udpBatch]mmsghdr
	outIo   [udpBatch]unix.Iovec
	outSess [udpBatch]*udpSession
	outN    int

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
	u := &udpLoop{}
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
		u.fwd[i].hdr.Iov = &u.fwdIo[i]
		u.fwd[i].hdr.Iovlen = 1
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
			if _, ok := pl.alive[s.b.addr]; ok {
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

// forward sends the first k datagrams of u.fwd on s's socket.
func (u *udpLoop) forward(s *udpSession, k int) {
	sent, bytes := 0, 0
	refused := false
	for sent < k {
		var n int
		var err error
		if k-sent == 1 {
			var w int
			w, err = sysWrite(s.fd, unsafe.Slice(u.fwdIo[sent].Base, u.fwdIo[sent].Len))
			if err == nil && w >= 0 {
				n = 1
			}
		} else {
			n, err = sysSendmmsg(s.fd, u.fwd[sent:k])
		}
		if err != nil {
			// ECONNREFUSED reports an ICMP error from the backend and
			// sends nothing: the error is consumed, try once more.
			if err == unix.ECONNREFUSED && !refused {
				refused = true
				continue
			}
			break // the rest of the batch is dropped, as a network would
		}
		for i := sent; i < sent+n; i++ {
			bytes += int(u.fwdIo[i].Len)
		}
		sent += n
	}
	if sent > 0 {
		m := s.b.m()
		m.packetsIn.Add(float64(sent))
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
		for i < j {
			n, err := sysSendmmsg(fd, u.out[i:j])
			if err != nil {
				if err == unix.EAGAIN || err == unix.ENOBUFS {
					i = j // the socket's buffer is full: drop, as a network would
				} else {
					i++ // this datagram cannot go (its client's address); the next may
				}
				continue
			}
			u.count(i, i+n)
			i += n
		}
	}
	clear(u.outSess[:u.outN])
	u.outN = 0
}

// count adds the replies out[from:to], sent, to their backends' metrics.
func (u *udpLoop) count(from, to int) {
	for from < to {
		s := u.outSess[from]
		packets, bytes := 0, 0
		for ; from < to && u.outSess[from] == s; from++ {
			packets++
			bytes += int(u.out[from].n)
		}
		m := s.b.m()
		m.packetsOut.Add(float64(packets))
		m.bytesOut.Add(float64(bytes))
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
