package proxy

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TCP congestion control of the proxy's own sockets.
//
// A proxied connection is two TCP connections, and the proxy sends on both:
// to the backend what the client uploads, to the client what the backend
// answers. Each side may run its own algorithm. The client side keeps the
// system's by default: clients may be far away, over lossy paths, where
// whatever the administrator chose (often BBR) is the point. The backend side
// is a hop inside the cluster, and there the proxy prefers CUBIC, falling
// back to Reno, which every kernel lets any process set. On a sub-millisecond
// path the two behave alike, and neither paces: without the fq qdisc, BBR
// paces with a high-resolution timer per burst, which on a virtual machine
// costs an exit to the hypervisor each time it is armed and each time it
// fires. Where the system default is BBR this doubles bulk throughput towards
// backends (README, Performance).
//
// Clients inside the cluster are as near as backends, and the same holds for
// them. So the listening sockets run the backend side's algorithm, and a
// flow that turns out to carry data to its client (clientSettleBytes) asks
// the kernel for the client's smallest round-trip time: a client at
// Options.NearClientRTT or beyond switches to the frontend side's algorithm
// before the bulk of the data leaves. The switch must go this way round:
// CUBIC or Reno to BBR works at any time, but a socket that started with BBR
// keeps pacing after it leaves BBR. Short connections never pay the check.

// The defaults of Options.BackendCongestionControl and
// FrontendCongestionControl. "system" stands for the system's default.
const (
	defaultBackendCongestion  = "cubic,reno"
	defaultFrontendCongestion = systemCongestion
	systemCongestion          = "system"
	defaultNearClientRTT      = time.Millisecond
)

// clientSettleBytes is what a flow sends to its client before the client's
// congestion control is settled: past TCP's initial window on any path, and
// too little for the algorithm to have mattered yet. The loop counts it; a
// copier takes a direction over only after one pump moved pumpBudget, so
// the choice is always made on the loop first.
const clientSettleBytes = 64 << 10

var _ = [pumpBudget - clientSettleBytes]struct{}{} // pumpBudget >= clientSettleBytes

// congestion is the algorithm one side's sockets run.
type congestion struct {
	// name is set on each socket of the side; nil keeps the system default,
	// also when the chosen algorithm is that default.
	name []byte
	// effective is the algorithm the side's sockets run.
	effective string
}

// pickCongestion resolves a comma-separated preference list to the first
// algorithm the kernel lets this process set; "system" is always taken.
// option names the setting in errors.
func pickCongestion(option, list string) (congestion, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		if fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return congestion{}, fmt.Errorf("%s: open a TCP socket: %w", option, err)
		}
	}
	defer unix.Close(fd)
	system, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		return congestion{}, fmt.Errorf("%s: read the system's congestion control: %w", option, err)
	}
	var names []string
	for name := range strings.SplitSeq(list, ",") {
		if name = strings.TrimSpace(name); name == "" {
			return congestion{}, fmt.Errorf("%s %q: empty algorithm name", option, list)
		}
		names = append(names, name)
	}
	var refused []string
	for _, name := range names {
		if name == systemCongestion {
			return congestion{effective: system}, nil
		}
		err := setCongestion(fd, []byte(name))
		switch {
		case err == nil && name == system:
			return congestion{effective: system}, nil
		case err == nil:
			return congestion{name: []byte(name), effective: name}, nil
		case errors.Is(err, unix.ENOENT):
			refused = append(refused, name+": not in net.ipv4.tcp_available_congestion_control")
		case errors.Is(err, unix.EPERM):
			refused = append(refused, name+": not in net.ipv4.tcp_allowed_congestion_control, and no CAP_NET_ADMIN")
		default:
			refused = append(refused, name+": "+err.Error())
		}
	}
	return congestion{}, fmt.Errorf("%s %q: the kernel takes none of these algorithms (%s)", option, list, strings.Join(refused, "; "))
}

// clientCongestion is how client sockets get their algorithm.
type clientCongestion struct {
	// listen is set on the listening sockets; accepted sockets inherit it.
	listen congestion
	// far is set on the sockets of clients found nearRTT or more away; nil
	// when every client keeps listen's algorithm.
	far     []byte
	nearRTT uint32 // microseconds
}

// newClientCongestion gives near clients the backend side's algorithm and
// far ones the frontend side's; nearRTT <= 0 gives every client the
// frontend side's.
func newClientCongestion(backend, frontend congestion, nearRTT time.Duration) clientCongestion {
	if nearRTT <= 0 || backend.effective == frontend.effective {
		return clientCongestion{listen: frontend}
	}
	return clientCongestion{listen: backend, far: []byte(frontend.effective), nearRTT: uint32(nearRTT.Microseconds())}
}

// apply sets the side's algorithm on fd. Failure leaves the system's: the
// algorithm was accepted at start, and the connection works either way.
func (c congestion) apply(fd int) {
	if c.name != nil {
		_ = setCongestion(fd, c.name)
	}
}

func setCongestion(fd int, name []byte) error {
	_, _, e := unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION,
		uintptr(unsafe.Pointer(unsafe.SliceData(name))), uintptr(len(name)), 0)
	return errnoErr(e)
}
