package proxy

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// offloadSoon hands every bulk direction to a copier at its first splice.
const offloadSoon = copyBufferSize

// copierOffloads counts the directions p's loops have handed to copiers.
func copierOffloads(p *testProxy) int {
	n := 0
	onLoops(p, func(_ int, l *loop) { n += l.offloads })
	return n
}

// sink is a backend that accepts connections and never reads from them, so
// whatever the proxy sends it soon stops at a full window.
func sink(t *testing.T, ip string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestCopiedFlowIdlesOut fills a backend that never reads: the copier that
// holds the upload waits for a window that never opens, and the flow must
// still end at its idle timeout, with a reset to the client.
func TestCopiedFlowIdlesOut(t *testing.T) {
	backend := sink(t, "127.0.1.1")
	port := freePort(t)
	p := newProxy(t, Options{loops: 1, offloadAfter: offloadSoon})
	r := rule("sink", port, nil, func(r *snapshot.Rule) {
		r.IdleTimeout = 300 * time.Millisecond
		r.TCPReset = true
	})
	r.Backends = []snapshot.Backend{{Addr: backend}}
	p.apply(t, r)

	c, err := dialFrom(clientIP(120), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	wrote := make(chan error, 1)
	go func() {
		chunk := make([]byte, 1<<20)
		for {
			if _, err := c.Write(chunk); err != nil {
				wrote <- err
				return
			}
		}
	}()
	select {
	case err := <-wrote:
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("upload into a stuck backend ended with %v, want a reset", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the flow outlived its idle timeout while a copier held it")
	}
	if copierOffloads(p) == 0 {
		t.Fatal("the upload never went to a copier")
	}
	if got := p.counter(p.metrics.idleTimeouts.WithLabelValues("default/sink")); got != 1 {
		t.Errorf("idle_timeouts_total = %v, want 1", got)
	}
	eventually(t, 5*time.Second, "flow closed", func() bool { return p.tcpConns.Load() == 0 })
}

// TestShutdownEndsCopiedFlows shuts the proxy down while copiers move data
// both ways on flows that never end: Shutdown returns at its drain timeout,
// the clients see their connections end, and the copiers' pipes and the
// flows' sockets are closed.
func TestShutdownEndsCopiedFlows(t *testing.T) {
	backends := startBackends(t, 2, 9032)
	port := freePort(t)
	p := newProxy(t, Options{loops: 2, offloadAfter: offloadSoon})
	p.apply(t, rule("busy", port, backends))
	mustBackendOf(t, clientIP(130), port)
	before := openFDs(t)

	ended := make(chan error, 8)
	for i := range 4 {
		c, err := dialFrom(clientIP(131+i), port)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			chunk := make([]byte, 256<<10)
			for {
				if _, err := c.Write(chunk); err != nil {
					return
				}
			}
		}()
		go func() {
			buf := make([]byte, 256<<10)
			for {
				if _, err := c.Read(buf); err != nil {
					ended <- err
					return
				}
			}
		}()
	}
	eventually(t, 5*time.Second, "directions on copiers", func() bool { return copierOffloads(p) >= 4 })

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with busy flows: %v, want deadline exceeded", err)
	}
	for range 4 {
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Fatal("a client's connection outlived Shutdown")
		}
	}
	if n := p.tcpConns.Load(); n != 0 {
		t.Fatalf("%d flows counted after Shutdown returned", n)
	}
	// The loops, their pipes and the flows' sockets are gone; the backends
	// (in this process too) close their ends when they see the resets.
	if !waitFor(10*time.Second, func() bool { return openFDs(t) <= before }) {
		t.Fatalf("%d descriptors open after Shutdown, %d before", openFDs(t), before)
	}
}
