package proxy

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stickylb/stickylb/dataplane/proxyheader"
	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// A rule with spec.proxyProtocol sends each backend a PROXY protocol header
// before the client's first byte: the client's address and port, and the
// frontend address and port the client connected to. The header goes out in
// the same write as whatever the client has sent by the time the backend
// accepts, so a client that speaks first costs no extra system call. A
// backend that fails before it took the header counts as a failed dial, and
// the client's next backend gets the same bytes.

// proxied is what a flow of such a rule carries until its header is out.
type proxied struct {
	version      proxyheader.Version
	client, dest netip.AddrPort
	// sent holds the header and the client's first bytes once they were
	// offered to a backend that then failed, for the next one.
	sent    *[]byte
	sentLen int
	// read and eof are what the first attempt took from the client.
	read int
	eof  bool
}

// newProxied returns the header state of a new flow on ln from client, or
// nil when the rule sends no header.
func newProxied(r *snapshot.Rule, ln *tcpListener, cfd int, client netip.AddrPort) *proxied {
	if r.ProxyProtocol == snapshot.ProxyNone {
		return nil
	}
	dest := ln.local
	if dest.Addr().IsUnspecified() {
		// A wildcard listener: the address is the one the client reached.
		dest = localAddr(cfd, dest)
	}
	return &proxied{version: proxyheader.Version(r.ProxyProtocol), client: client, dest: dest}
}

// localAddr is the local address of a connected socket (def when unknown).
func localAddr(fd int, def netip.AddrPort) netip.AddrPort {
	var rsa unix.RawSockaddrAny
	size := uint32(unix.SizeofSockaddrAny)
	if _, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&size))); e != 0 {
		return def
	}
	if a := addrPortOf(&rsa); a.IsValid() {
		return a
	}
	return def
}

// release returns the retry buffer.
func (pp *proxied) release() {
	if pp != nil && pp.sent != nil {
		copyBuffers.Put(pp.sent)
		pp.sent = nil
	}
}

// headerResult is what sendHeader did.
type headerResult struct {
	rest []byte // not yet written (in lp.scratch or pp.sent): dst was full
	read int    // client bytes read and sent along
	eof  bool   // the client had already closed its side
}

// sendHeader writes the header, with the client's first bytes if any, to
// the backend that just accepted. ok is false when the flow went on to the
// next backend or closed.
func (f *tcpFlow) sendHeader(lp *loop) (res headerResult, ok bool) {
	pp := f.pp
	var buf []byte
	if pp.sent != nil {
		buf = (*pp.sent)[:pp.sentLen]
		res.read, res.eof = pp.read, pp.eof
	} else {
		buf = proxyheader.Append(lp.scratch[:0], pp.version, pp.client, pp.dest)
		if f.up.readable {
			for {
				n, err := sysRead(f.cfd, lp.scratch[len(buf):])
				switch {
				case err == unix.EINTR:
					continue
				case err == unix.EAGAIN:
					f.up.readable = false
				case err != nil:
					f.close(lp)
					return res, false
				case n == 0:
					res.eof = true
				default:
					res.read = n
					if n < len(lp.scratch)-len(buf) && !f.up.hup {
						f.up.readable = false // a short read drained the socket, as in pump
					}
					buf = lp.scratch[:len(buf)+n]
				}
				break
			}
		}
		if res.read > 0 {
			f.rs.m.headersWithData.Inc()
		} else {
			f.rs.m.headersAlone.Inc()
		}
	}
	for {
		n, err := sysWrite(f.bfd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			res.rest = buf
		case err != nil:
			// Nothing reached the backend: the next one gets the same bytes.
			if pp.sent == nil {
				pp.sent = copyBuffers.Get().(*[]byte)
				pp.sentLen = copy(*pp.sent, buf)
				pp.read, pp.eof = res.read, res.eof
			}
			f.retryDial(lp)
			return res, false
		default:
			res.rest = buf[n:]
		}
		return res, true
	}
}
