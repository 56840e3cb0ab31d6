package proxy

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls of a loop's hot path. Every socket a loop touches is
// non-blocking, so none of these can block: they go straight to the kernel
// (RawSyscall) without telling the Go scheduler, which would otherwise
// prepare to hand the thread's processor to someone else on every call.
// They return unix.Errno values, so callers compare with unix.EAGAIN etc.

func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

func sysRead(fd int, p []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func sysWrite(fd int, p []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// sysSplice moves up to n bytes from in to out; one of them is a pipe.
func sysSplice(in, out, n int) (int, error) {
	m, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return 0, e
	}
	return int(m), nil
}

// sysSpliceLong is sysSplice for the bulk copiers, which run on their own
// goroutines: a long splice tells the scheduler, so that while it runs the
// processor goes to another goroutine (see bulk.go).
func sysSpliceLong(in, out, n int) (int, error) {
	m, _, e := unix.Syscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return 0, e
	}
	return int(m), nil
}

func sysClose(fd int) {
	_, _, _ = unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

func sysShutdownWrite(fd int) {
	_, _, _ = unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0)
}

func sysEpollAdd(epfd, fd int, ev *unix.EpollEvent) error {
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), unix.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	return errnoErr(e)
}

func sysSetInt(fd, level, opt, value int) error {
	v := int32(value)
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&v)), 4, 0)
	return errnoErr(e)
}

// sysTCPSocket opens a non-blocking TCP socket with TCP_NODELAY set.
func sysTCPSocket(family int) (int, error) {
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, e
	}
	if err := sysSetInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		sysClose(int(fd))
		return -1, err
	}
	return int(fd), nil
}

// sysTCPInfo reads a TCP socket's TCP_INFO.
func sysTCPInfo(fd int, info *unix.TCPInfo) bool {
	size := uint32(unsafe.Sizeof(*info))
	_, _, e := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_INFO,
		uintptr(unsafe.Pointer(info)), uintptr(unsafe.Pointer(&size)), 0)
	return e == 0
}

// sysTCPSegments reads the segments a TCP socket received and sent.
func sysTCPSegments(fd int) (in, out uint32, ok bool) {
	var info unix.TCPInfo
	if !sysTCPInfo(fd, &info) {
		return 0, 0, false
	}
	return info.Segs_in, info.Segs_out, true
}

// sysTCPMinRTT reads the smallest round-trip time a TCP socket has seen, in
// microseconds; false if it has none yet.
func sysTCPMinRTT(fd int) (uint32, bool) {
	var info unix.TCPInfo
	if !sysTCPInfo(fd, &info) || info.Min_rtt == ^uint32(0) {
		return 0, false
	}
	return info.Min_rtt, true
}

// accept takes a pending connection as a non-blocking socket. x/sys's
// Accept4 would spend a getsockopt on every connection to tell L2TP sockets
// apart; this reads the peer's address itself.
func accept(fd int) (int, netip.AddrPort, error) {
	var rsa unix.RawSockaddrAny
	size := uint32(unix.SizeofSockaddrAny)
	nfd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&size)),
		unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, e
	}
	return int(nfd), addrPortOf(&rsa), nil
}

// addrPortOf reads an IPv4 or IPv6 socket address.
func addrPortOf(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), getPort(&sa.Port))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), getPort(&sa.Port))
	}
	return netip.AddrPort{}
}

// rawSockaddr is an address in the kernel's layout. x/sys's Sockaddr types
// write their raw form into themselves on every call, so one of them cannot
// be shared between loops; this is made on the stack where it is used.
type rawSockaddr struct {
	v4  unix.RawSockaddrInet4
	v6  unix.RawSockaddrInet6
	is6 bool
}

func newRawSockaddr(a netip.AddrPort) rawSockaddr {
	var r rawSockaddr
	ip := a.Addr()
	if ip.Is4() || ip.Is4In6() {
		r.v4.Family = unix.AF_INET
		r.v4.Addr = ip.Unmap().As4()
		putPort(&r.v4.Port, a.Port())
		return r
	}
	r.is6 = true
	r.v6.Family = unix.AF_INET6
	r.v6.Addr = ip.As16()
	putPort(&r.v6.Port, a.Port())
	return r
}

func (r *rawSockaddr) family() int {
	if r.is6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

// connect starts connecting fd to r; a non-blocking socket says EINPROGRESS.
func (r *rawSockaddr) connect(fd int) error {
	ptr, size := unsafe.Pointer(&r.v4), uintptr(unix.SizeofSockaddrInet4)
	if r.is6 {
		ptr, size = unsafe.Pointer(&r.v6), uintptr(unix.SizeofSockaddrInet6)
	}
	_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(ptr), size)
	return errnoErr(e)
}

// putPort stores port in network byte order.
func putPort(dst *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(dst))
	b[0], b[1] = byte(port>>8), byte(port)
}

// getPort reads a port in network byte order.
func getPort(src *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(src))
	return uint16(b[0])<<8 | uint16(b[1])
}
