package proxy

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A loop is one TCP event loop: an epoll instance and the one goroutine that
// waits on it and owns every socket registered with it. A flow lives on the
// loop that accepted it, so its sockets, buffers and timers are only ever
// touched by that goroutine and need no locks.
//
// This is how HAProxy and nginx move bytes: sockets are non-blocking and
// registered once, edge-triggered, for both directions; I/O is attempted as
// soon as it may succeed, and a short read means the socket is drained. Go's
// net package would instead park a goroutine per direction and register
// every socket with the runtime's poller, which costs a dozen more system
// calls and two goroutine switches per proxied connection.
type loop struct {
	p    *Proxy
	epfd int
	wake int // eventfd: tasks are queued

	// slots maps a file descriptor to what handles its events. seq tells a
	// stale event (for a descriptor closed and reused in the same batch of
	// events) from a current one.
	slots []slot
	seq   uint32

	tasksMu sync.Mutex
	tasks   []func()
	woken   bool // a wake-up is pending: the next post need not write the eventfd

	timers timerHeap
	now    time.Duration // monotonic, since epoch; refreshed on every wake-up

	flows flowList
	// load counts the flows that live on the loop, including connections
	// handed to it and not yet started; other loops read it to balance.
	load atomic.Int32
	// again holds directions to pump once more before sleeping.
	again, pumping []pending
	// copiers counts the directions handed to copier goroutines; the loop
	// outlives them.
	copiers  int
	offloads int // directions handed to copiers so far

	scratch []byte   // the read buffer every flow of the loop borrows
	udp     *udpLoop // UDP batches and the replies waiting to leave; nil until a UDP listener uses the loop
	pipes   []*pipe  // free splice pipes
	events  []unix.EpollEvent
	stopped bool
	done    chan struct{} // closed when the loop has ended
}

type slot struct {
	h   pollable
	seq uint32
}

// pollable handles the epoll events of one file descriptor.
type pollable interface {
	event(l *loop, fd int, events uint32)
}

// timed is something with a deadline on a loop.
type timed interface {
	expire(l *loop)
}

func newLoop(p *Proxy) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = unix.Close(epfd)
		return nil, err
	}
	l := &loop{p: p, epfd: epfd, wake: wake, scratch: make([]byte, copyBufferSize), events: make([]unix.EpollEvent, 128), done: make(chan struct{})}
	l.flows.init()
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		_ = unix.Close(wake)
		_ = unix.Close(epfd)
		return nil, err
	}
	l.now = time.Since(epoch)
	go l.run()
	return l, nil
}

// register adds fd to the loop with events, handled by h.
func (l *loop) register(fd int, events uint32, h pollable) error {
	l.seq++
	if fd >= len(l.slots) {
		grown := make([]slot, max(2*len(l.slots), fd+1, 64))
		copy(grown, l.slots)
		l.slots = grown
	}
	l.slots[fd] = slot{h: h, seq: l.seq}
	ev := unix.EpollEvent{Events: events, Fd: int32(fd), Pad: int32(l.seq)}
	if err := sysEpollAdd(l.epfd, fd, &ev); err != nil {
		l.slots[fd] = slot{}
		return err
	}
	return nil
}

// forget drops fd from the loop's table. Closing fd removes it from the
// epoll set; forget alone is for descriptors that stay open.
func (l *loop) forget(fd int) {
	if fd >= 0 && fd < len(l.slots) {
		l.slots[fd] = slot{}
	}
}

// closeFD forgets and closes a descriptor the loop owns.
func (l *loop) closeFD(fd int) {
	l.forget(fd)
	sysClose(fd)
}

// post queues fn to run on the loop.
func (l *loop) post(fn func()) {
	l.tasksMu.Lock()
	l.tasks = append(l.tasks, fn)
	wake := !l.woken
	l.woken = true
	l.tasksMu.Unlock()
	if wake {
		var one = [8]byte{1}
		_, _ = unix.Write(l.wake, one[:])
	}
}

// do runs fn on the loop and waits for it.
func (l *loop) do(fn func()) {
	done := make(chan struct{})
	l.post(func() {
		defer close(done)
		fn()
	})
	<-done
}

func (l *loop) runTasks() {
	var buf [8]byte
	_, _ = unix.Read(l.wake, buf[:])
	l.tasksMu.Lock()
	tasks := l.tasks
	l.tasks = nil
	l.woken = false
	l.tasksMu.Unlock()
	for _, fn := range tasks {
		fn()
	}
}

func (l *loop) run() {
	defer close(l.done)
	var yielded time.Duration
	for !l.stopped || l.copiers > 0 {
		wait := l.timers.waitMillis(l.now)
		if len(l.again) > 0 {
			wait = 0
		}
		n, err := unix.EpollWait(l.epfd, l.events, wait)
		l.now = time.Since(epoch)
		// A goroutine that never passes through the scheduler looks stuck to
		// the runtime's monitor, which then preempts it every 10 ms and
		// wakes every 20 µs for a while after. Yielding now and then costs
		// far less.
		if l.now-yielded > time.Millisecond {
			yielded = l.now
			runtime.Gosched()
		}
		if err != nil && err != unix.EINTR {
			l.p.log.Error(err, "epoll_wait")
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for i := range n {
			ev := &l.events[i]
			fd := int(ev.Fd)
			if fd == l.wake {
				l.runTasks()
				continue
			}
			if fd >= len(l.slots) {
				continue
			}
			s := l.slots[fd]
			if s.h == nil || s.seq != uint32(ev.Pad) {
				continue // closed earlier in this batch
			}
			s.h.event(l, fd, ev.Events)
		}
		if l.udp != nil && l.udp.outN > 0 {
			l.udp.flush() // the UDP replies read from every ready session leave together
		}
		if n == len(l.events) && len(l.events) < 4096 {
			l.events = make([]unix.EpollEvent, 2*len(l.events))
		}
		l.pumping, l.again = l.again, l.pumping[:0]
		for _, pd := range l.pumping {
			if !pd.f.closed && pd.h.readable {
				pd.f.pump(l, pd.h)
			}
		}
		clear(l.pumping)
		l.timers.expire(l)
	}
	_ = unix.Close(l.wake)
	_ = unix.Close(l.epfd)
	if l.udp != nil {
		l.udp.free()
	}
	for _, pp := range l.pipes {
		pp.close()
	}
	l.pipes = nil
}

// stop ends the loop once its copiers are back. Its flows must be closed
// (or closing) first; wait on l.done to see it end.
func (l *loop) stop() { l.post(func() { l.stopped = true }) }

// pipe is a pipe pair for splice(2). A flow holds one only while spliced
// bytes wait in it for a slow destination; otherwise it goes back to the loop.
type pipe struct{ r, w int }

// pipeSize is the capacity asked of a splice pipe: bigger pipes move bulk
// data in fewer system calls.
const pipeSize = 1 << 20

// maxFreePipes bounds the pipes a loop keeps for reuse.
const maxFreePipes = 16

func (l *loop) getPipe() *pipe {
	if n := len(l.pipes); n > 0 {
		pp := l.pipes[n-1]
		l.pipes = l.pipes[:n-1]
		return pp
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil
	}
	// Best effort: an unprivileged process may be held to a smaller pipe.
	_, _ = unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}
}

// putPipe takes back an empty pipe.
func (l *loop) putPipe(pp *pipe) {
	if len(l.pipes) < maxFreePipes {
		l.pipes = append(l.pipes, pp)
		return
	}
	pp.close()
}

func (pp *pipe) close() {
	_ = unix.Close(pp.r)
	_ = unix.Close(pp.w)
}

// timer is a deadline in a loop's timer heap.
type timer struct {
	when  time.Duration // monotonic, since epoch
	index int           // in the heap; -1 when not queued
	owner timed
}

// timerHeap is a min-heap of deadlines.
type timerHeap []*timer

// set queues t to fire at when, or moves it there.
func (h *timerHeap) set(t *timer, when time.Duration) {
	t.when = when
	if t.index >= 0 {
		h.fix(t.index)
		return
	}
	t.index = len(*h)
	*h = append(*h, t)
	h.up(t.index)
}

// cancel removes t if it is queued.
func (h *timerHeap) cancel(t *timer) {
	i := t.index
	if i < 0 {
		return
	}
	last := len(*h) - 1
	if i != last {
		h.swap(i, last)
	}
	(*h)[last] = nil
	*h = (*h)[:last]
	t.index = -1
	if i != last {
		h.fix(i)
	}
}

// waitMillis is how long epoll_wait may block: until the next deadline.
func (h timerHeap) waitMillis(now time.Duration) int {
	if len(h) == 0 {
		return -1
	}
	d := h[0].when - now
	if d <= 0 {
		return 0
	}
	return int((d + time.Millisecond - 1) / time.Millisecond)
}

// expire fires every timer that is due.
func (h *timerHeap) expire(l *loop) {
	for len(*h) > 0 && (*h)[0].when <= l.now {
		t := (*h)[0]
		h.cancel(t)
		t.owner.expire(l)
	}
}

func (h timerHeap) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}

func (h timerHeap) fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h timerHeap) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if h[parent].when <= h[i].when {
			return
		}
		h.swap(i, parent)
		i = parent
	}
}

func (h timerHeap) down(i int) bool {
	start := i
	for {
		smallest, l, r := i, 2*i+1, 2*i+2
		if l < len(h) && h[l].when < h[smallest].when {
			smallest = l
		}
		if r < len(h) && h[r].when < h[smallest].when {
			smallest = r
		}
		if smallest == i {
			return i > start
		}
		h.swap(i, smallest)
		i = smallest
	}
}

// flowList is an intrusive list of a loop's flows, for shutdown.
type flowList struct{ head tcpFlow }

func (fl *flowList) init() { fl.head.next, fl.head.prev = &fl.head, &fl.head }

func (fl *flowList) add(f *tcpFlow) {
	f.prev, f.next = &fl.head, fl.head.next
	fl.head.next.prev = f
	fl.head.next = f
}

func (fl *flowList) remove(f *tcpFlow) {
	if f.next == nil {
		return
	}
	f.prev.next, f.next.prev = f.next, f.prev
	f.next, f.prev = nil, nil
}

// each calls fn for every flow; fn may remove the flow it is given.
func (fl *flowList) each(fn func(*tcpFlow)) {
	for f := fl.head.next; f != &fl.head; {
		next := f.next
		fn(f)
		f = next
	}
}

// epoch anchors the proxy's monotonic timestamps.
var epoch = time.Now()
