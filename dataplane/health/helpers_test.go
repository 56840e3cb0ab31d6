package health

import (
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// recorder collects notifications together with the target's status at the
// moment of each one. The prober is blocked inside notify, so those counters
// are exact: they say how many probes it took to flip.
type recorder struct {
	m *Monitor

	mu       sync.Mutex
	events   []Transition
	statuses []TargetStatus
}

func (r *recorder) notify(tr Transition) {
	st, _ := statusOf(r.m, tr.Target)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, tr)
	r.statuses = append(r.statuses, st)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// wait returns the n-th notification (1-based), failing the test if it does
// not arrive within d.
func (r *recorder) wait(t *testing.T, n int, d time.Duration) (Transition, TargetStatus) {
	t.Helper()
	waitFor(t, d, func() bool { return r.count() >= n }, "notification %d", n)
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.events[n-1], r.statuses[n-1]
}

func newMonitor(t *testing.T) (*Monitor, *recorder) {
	t.Helper()
	rec := &recorder{}
	m := New(rec.notify)
	rec.m = m
	t.Cleanup(m.Close)
	return m, rec
}

func statusOf(m *Monitor, target Target) (TargetStatus, bool) {
	for _, s := range m.Snapshot() {
		if s.Target == target {
			return s, true
		}
	}
	return TargetStatus{}, false
}

func mustStatus(t *testing.T, m *Monitor, target Target) TargetStatus {
	t.Helper()
	s, ok := statusOf(m, target)
	if !ok {
		t.Fatalf("target %s is not in the snapshot", target)
	}
	return s
}

// waitProbes waits until target has completed at least n probes.
func waitProbes(t *testing.T, m *Monitor, target Target, n uint64, d time.Duration) TargetStatus {
	t.Helper()
	var s TargetStatus
	waitFor(t, d, func() bool {
		s, _ = statusOf(m, target)
		return s.Probes >= n
	}, "%d probes of %s", n, target)
	return s
}

func waitFor(t *testing.T, d time.Duration, cond func() bool, what string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for "+what, append([]any{d}, args...)...)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listenTCP listens on addr and accepts and closes connections until the
// listener is closed; a listener that never accepts would fill its backlog
// and turn later probes into timeouts.
func listenTCP(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

func addrPortOf(t *testing.T, ln net.Listener) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// closedPort returns a port on ip that nothing listens on.
func closedPort(t *testing.T, ip string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	ap := addrPortOf(t, ln)
	ln.Close()
	return ap
}

func tcpTarget(ap netip.AddrPort, interval time.Duration, threshold int) Target {
	return Target{Addr: ap.Addr(), Spec: Spec{
		Protocol: TCP, Port: int(ap.Port()), Interval: interval, Threshold: threshold,
	}}
}

// serveHTTP starts an HTTP (or, with useTLS, HTTPS with httptest's
// self-signed certificate) server on ip and counts the connections it
// accepts.
func serveHTTP(t *testing.T, ip string, useTLS bool, h http.Handler) (netip.AddrPort, func() int) {
	t.Helper()
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	var mu sync.Mutex
	conns := 0
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			mu.Lock()
			conns++
			mu.Unlock()
		}
	}
	if useTLS {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return addrPortOf(t, ln), func() int {
		mu.Lock()
		defer mu.Unlock()
		return conns
	}
}
