package proxy

import (
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Long bulk transfers leave their loop for a copier goroutine.
//
// On a loop, the kernel's splice and loopback work of every flow runs on
// the loop's one thread, so a few busy streams share one CPU's worth of
// time however many threads the machine would give them. A direction that
// moves a whole pump budget in one go is handed to a copier: a goroutine
// that splices it through its pipe with system calls that tell the Go
// scheduler they may take long, so that the streams spread over threads the
// way goroutine-per-connection proxies spread them. In make bench this is
// worth about 15% of bulk throughput. Short and interactive connections
// never leave their loop.
//
// The loop keeps the flow: its sockets stay registered with the loop's
// epoll, and the loop passes their readiness on to the copier (wake). While
// a copier holds a direction (half.busy) it alone touches the direction's
// pipe and its count of bytes in it; the loop defers closing the flow until
// the copier is back, and asks it to come back (abort). A copier whose
// source has been quiet for copierLinger hands the direction, and the pipe
// once empty, back to the loop, so an idle flow holds neither.

// copierLinger is how long a copier waits for more data before it hands a
// quiet direction (and its pipe) back to the loop.
const copierLinger = 20 * time.Millisecond

// copyState is what a half shares with its copier.
type copyState struct {
	wake   chan struct{} // readiness of src or dst, as the loop saw it
	active atomic.Int64  // when the copier last moved bytes (since epoch)
}

// copied is how a copier's turn ended.
type copied struct {
	eof    bool
	failed bool
}

// offload hands h to a copier goroutine. h is in bulk mode and holds a pipe.
func (f *tcpFlow) offload(lp *loop, h *half) {
	h.busy = true
	h.readable = false // events while busy set it again
	lp.offloads++
	if h.cs == nil {
		h.cs = &copyState{wake: make(chan struct{}, 1)}
	}
	lp.copiers++
	go func() {
		c := h.copy(&f.abort)
		lp.post(func() { f.copied(lp, h, c) })
	}()
}

// signal tells h's copier that one of its sockets is ready.
func (h *half) signal() {
	select {
	case h.cs.wake <- struct{}{}:
	default:
	}
}

// copy splices from src through the pipe to dst until src ends, a socket
// fails, abort is set or src stays quiet for copierLinger. It runs on the
// copier goroutine and waits for readiness on wake.
func (h *half) copy(abort *atomic.Bool) (c copied) {
	t := time.NewTimer(copierLinger)
	defer t.Stop()
	for !abort.Load() {
		if h.inPipe > 0 {
			n, err := sysSpliceLong(h.pipe.r, h.dst, h.inPipe)
			switch err {
			case nil:
				h.inPipe -= n
			case unix.EINTR:
			case unix.EAGAIN:
				<-h.cs.wake
			default:
				c.failed = true
				return c
			}
			continue
		}
		n, err := sysSpliceLong(h.src, h.pipe.w, pipeSize)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			t.Reset(copierLinger)
			select {
			case <-h.cs.wake:
				continue
			case <-t.C:
				return c
			}
		case err != nil:
			c.failed = true
			return c
		case n == 0:
			c.eof = true
			return c
		}
		h.inPipe = n
		h.cs.active.Store(int64(time.Since(epoch)))
		h.bytes.Add(float64(n))
	}
	return c
}

// copied takes h back from its copier, on the loop.
func (f *tcpFlow) copied(lp *loop, h *half, c copied) {
	h.busy = false
	lp.copiers--
	if a := time.Duration(h.cs.active.Load()); a > f.lastActive {
		f.lastActive = a
	}
	if f.closing || c.failed {
		f.closing = false
		f.close(lp)
		return
	}
	if c.eof {
		h.eof = true
	}
	h.readable = true
	f.pump(lp, h)
}
