package health

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stickylb/stickylb/dataplane/proxyheader"
)

// ErrClosed is returned by Update after Close.
var ErrClosed = errors.New("health: monitor closed")

// Monitor probes a set of targets, one goroutine per target, and calls notify
// when a target's health flips.
//
// Status and Snapshot never take a lock: the running set is an immutable map
// replaced on Update, and each target's state lives in atomics, so the
// dataplane can ask on every new flow.
type Monitor struct {
	notify func(Transition)
	// clients are the HTTP(S) clients by the PROXY protocol header their
	// connections open with (none, v1, v2).
	clients [3]*http.Client

	mu      sync.Mutex // serialises Update and Close
	closed  bool
	probers atomic.Pointer[map[Target]*prober]
}

// New returns a Monitor that probes nothing until Update.
//
// notify is called from the probing goroutines, concurrently for different
// targets and in order for any one target, and only on transitions. It must
// not block for long (that target's probing waits for it) and must not call
// Update or Close, which wait for probers to stop. A nil notify is allowed.
func New(notify func(Transition)) *Monitor {
	m := &Monitor{notify: notify}
	for v := range m.clients {
		m.clients[v] = newHTTPClient(proxyheader.Version(v))
	}
	m.probers.Store(&map[Target]*prober{})
	return m
}

// Update makes targets the set being probed: new targets start (Up, first
// probe at a random offset within their interval so large pools do not probe
// in lockstep), targets no longer listed stop, and targets still listed keep
// running with their state and counters. Duplicates share one prober.
// Changing any field of a target's Spec makes it a new target.
//
// Invalid targets are skipped and reported in the returned error while the
// valid ones are applied: one bad rule must not stop the probing of others.
// Update returns after removed targets' goroutines have exited, so no
// notification for a removed target arrives after it returns.
func (m *Monitor) Update(targets []Target) error {
	var errs []error
	want := make(map[Target]struct{}, len(targets))
	for _, t := range targets {
		if err := t.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		want[t] = struct{}{}
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	current := *m.probers.Load()
	next := make(map[Target]*prober, len(want))
	var removed []*prober
	for t, p := range current {
		if _, ok := want[t]; ok {
			next[t] = p
		} else {
			removed = append(removed, p)
		}
	}
	for t := range want {
		if _, ok := next[t]; !ok {
			next[t] = m.start(t)
		}
	}
	m.probers.Store(&next)
	stopAll(removed)
	return errors.Join(errs...)
}

// Close stops all probing and waits for it to end. Later Updates fail.
func (m *Monitor) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.closed = true
	current := *m.probers.Load()
	m.probers.Store(&map[Target]*prober{})
	running := make([]*prober, 0, len(current))
	for _, p := range current {
		running = append(running, p)
	}
	stopAll(running)
	for _, c := range m.clients {
		c.CloseIdleConnections()
	}
}

// Status reports whether t is up, and whether t is being probed at all
// (known). A target that is not probed reports up=false, known=false; the
// caller decides what an unprobed backend means.
func (m *Monitor) Status(t Target) (up, known bool) {
	p, ok := (*m.probers.Load())[t]
	if !ok {
		return false, false
	}
	return p.up.Load(), true
}

// Snapshot returns the status of every probed target, ordered by address and
// then spec, for metrics and status reporting.
func (m *Monitor) Snapshot() []TargetStatus {
	current := *m.probers.Load()
	out := make([]TargetStatus, 0, len(current))
	for _, p := range current {
		out = append(out, p.status())
	}
	slices.SortFunc(out, func(a, b TargetStatus) int { return compareTargets(a.Target, b.Target) })
	return out
}

func compareTargets(a, b Target) int {
	return cmp.Or(
		a.Addr.Compare(b.Addr),
		cmp.Compare(a.Spec.Port, b.Spec.Port),
		cmp.Compare(a.Spec.Protocol, b.Spec.Protocol),
		cmp.Compare(a.Spec.RequestPath, b.Spec.RequestPath),
		cmp.Compare(a.Spec.Interval, b.Spec.Interval),
		cmp.Compare(a.Spec.Threshold, b.Spec.Threshold),
		cmp.Compare(a.Spec.ProxyHeader, b.Spec.ProxyHeader),
	)
}

func (m *Monitor) start(t Target) *prober {
	ctx, cancel := context.WithCancel(context.Background())
	p := &prober{
		target:  t,
		checker: newChecker(t.Spec, m.clients[t.Spec.ProxyHeader]),
		notify:  m.notify,
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	p.up.Store(true)
	go p.run(ctx, rand.N(t.Spec.Interval))
	return p
}

// stopAll cancels every prober first and then waits, so stopping many costs
// one in-flight probe's cancellation, not the sum of them.
func stopAll(ps []*prober) {
	for _, p := range ps {
		p.cancel()
	}
	for _, p := range ps {
		<-p.done
	}
}

// prober probes one target until cancelled.
type prober struct {
	target  Target
	checker checker
	notify  func(Transition)
	cancel  context.CancelFunc
	done    chan struct{} // closed when run returns

	up       atomic.Bool
	probes   atomic.Uint64
	failures atomic.Uint64
	last     atomic.Pointer[result]

	// streak counts consecutive results that disagree with the current
	// state. Only the run goroutine touches it.
	streak int
}

type result struct {
	ok     bool
	reason string
	at     time.Time
}

func (p *prober) run(ctx context.Context, firstDelay time.Duration) {
	defer close(p.done)
	timer := time.NewTimer(firstDelay)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		r := p.probe(ctx)
		if ctx.Err() != nil {
			// Stopped mid-probe: the result says nothing about the
			// backend and nobody is listening any more.
			return
		}
		p.record(r)
		// Keep a fixed cadence from probe start; a negative duration
		// fires at once.
		timer.Reset(p.target.Spec.Interval - time.Since(r.at))
	}
}

func (p *prober) probe(ctx context.Context) result {
	timeout := p.target.Spec.Timeout()
	start := time.Now()
	probeCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ok, reason := p.checker.check(probeCtx, p.target.addrPort())
	if !ok && errors.Is(probeCtx.Err(), context.DeadlineExceeded) {
		reason = fmt.Sprintf("timeout after %v", timeout)
	}
	return result{ok: ok, reason: reason, at: start}
}

// record counts r and flips the state once Threshold consecutive results
// disagree with it.
func (p *prober) record(r result) {
	p.probes.Add(1)
	if !r.ok {
		p.failures.Add(1)
	}
	p.last.Store(&r)
	if r.ok == p.up.Load() {
		p.streak = 0
		return
	}
	p.streak++
	if p.streak < p.target.Spec.Threshold {
		return
	}
	p.streak = 0
	// Publish before notifying, so the dataplane acts on the new state even
	// if the listener is slow.
	p.up.Store(r.ok)
	if p.notify != nil {
		p.notify(Transition{Target: p.target, Up: r.ok, Reason: r.reason, At: r.at})
	}
}

func (p *prober) status() TargetStatus {
	s := TargetStatus{
		Target:   p.target,
		Up:       p.up.Load(),
		Probes:   p.probes.Load(),
		Failures: p.failures.Load(),
	}
	if r := p.last.Load(); r != nil {
		s.LastReason = r.reason
		s.LastProbe = r.at
	}
	return s
}
