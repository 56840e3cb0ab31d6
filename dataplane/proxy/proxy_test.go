package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/internal/testbackend"
)

func TestClientIPPinsEveryClientAndSpreadsEvenly(t *testing.T) {
	backends := startBackends(t, 4, 9001)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends))

	const clients, perClient = 500, 5
	pinned := make([]string, clients)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	sem := make(chan struct{}, 32)
	for i := range clients {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			for range perClient {
				name, c, err := backendOf(clientIP(i), port)
				if err != nil {
					errs <- err
					return
				}
				c.Close()
				mu.Lock()
				if pinned[i] == "" {
					pinned[i] = name
				} else if pinned[i] != name {
					errs <- errors.New(clientIP(i).String() + " moved from " + pinned[i] + " to " + name)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	count := map[string]int{}
	for _, b := range pinned {
		count[b]++
	}
	if len(count) != 4 {
		t.Fatalf("clients reached %d backends, want 4: %v", len(count), count)
	}
	// Each backend holds a quarter of the table (give or take a slot), so
	// its count of these clients is binomial: 125 ± 9.7. The clients are
	// fixed, so this is one draw; 3.5 standard deviations either way fails
	// one draw in 500 of an even table.
	sd := math.Sqrt(clients * 0.25 * 0.75)
	for b, n := range count {
		if math.Abs(float64(n)-clients/4) > 3.5*sd {
			t.Errorf("spread %v: %s has %d clients, want %d ± %.0f", count, b, n, clients/4, 3.5*sd)
		}
	}
	t.Logf("500 clients over 4 backends: %v", count)
}

func TestPersistenceModes(t *testing.T) {
	backends := startBackends(t, 4, 9002)
	p := newProxy(t, Options{})
	ipPort, ipProtoPort, nonePort := freePort(t), freePort(t), freePort(t)
	all := protocols(snapshot.TCP, snapshot.UDP)
	p.apply(t,
		rule("clientip", ipPort, backends, all),
		rule("clientipprotocol", ipProtoPort, backends, all, persistence(snapshot.PersistenceClientIPProtocol)),
		rule("none", nonePort, backends, persistence(snapshot.PersistenceNone)),
	)

	t.Run("ClientIP sends a client's TCP and UDP to one backend", func(t *testing.T) {
		for i := range 50 {
			tcp := mustBackendOf(t, clientIP(i), ipPort)
			udp, err := udpExchange(t, udpClient(t, clientIP(i), ipPort))
			if err != nil {
				t.Fatal(err)
			}
			if tcp != udp {
				t.Errorf("%s: TCP to %s, UDP to %s", clientIP(i), tcp, udp)
			}
		}
	})
	t.Run("ClientIPProtocol is consistent per client and protocol", func(t *testing.T) {
		differ := 0
		for i := range 100 {
			tcp := mustBackendOf(t, clientIP(i), ipProtoPort)
			if again := mustBackendOf(t, clientIP(i), ipProtoPort); again != tcp {
				t.Errorf("%s TCP moved %s -> %s", clientIP(i), tcp, again)
			}
			var udps []string
			for range 3 { // fresh source ports: still one backend per (IP, protocol)
				u, err := udpExchange(t, udpClient(t, clientIP(i), ipProtoPort))
				if err != nil {
					t.Fatal(err)
				}
				udps = append(udps, u)
			}
			if distinct := slices.Compact(slices.Clone(udps)); len(distinct) != 1 {
				t.Errorf("%s UDP went to %v", clientIP(i), udps)
			}
			if udps[0] != tcp {
				differ++
			}
		}
		// With the protocol in the key, TCP and UDP pick independently:
		// about 3 in 4 clients land on different backends.
		if differ < 50 {
			t.Errorf("only %d of 100 clients have different TCP and UDP backends; the protocol is not in the key", differ)
		}
	})
	t.Run("None spreads one client over backends", func(t *testing.T) {
		seen := map[string]bool{}
		for range 40 {
			seen[mustBackendOf(t, clientIP(7), nonePort)] = true
		}
		if len(seen) < 3 {
			t.Errorf("40 connections from one IP reached only %v", seen)
		}
	})
}

func backendsOf(t *testing.T, n int, port uint16) []string {
	return testbackend.Pins(t, n, frontend(port))
}

func TestPoolChangesMoveFewClients(t *testing.T) {
	backends := startBackends(t, 11, 9003)
	ten := backends[:10]
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, ten))
	const clients = 500
	before := backendsOf(t, clients, port)

	// Remove 127.0.1.3: only its clients move, plus under 1% of the others.
	removed := ten[2].Name
	var rest []*backendServer
	for _, b := range ten {
		if b.Name != removed {
			rest = append(rest, b)
		}
	}
	p.apply(t, rule("web", port, rest))
	after := backendsOf(t, clients, port)
	others, movedOthers := 0, 0
	for i := range before {
		if before[i] == removed {
			if after[i] == removed {
				t.Errorf("%s still on removed backend", clientIP(i))
			}
			continue
		}
		others++
		if after[i] != before[i] {
			movedOthers++
		}
	}
	if float64(movedOthers) >= 0.01*float64(others) {
		t.Errorf("removing one backend moved %d of %d other clients (want < 1%%)", movedOthers, others)
	}

	// Add an 11th to the original ten: at most 1/11 + 1% move.
	p.apply(t, rule("web", port, backends))
	added := backendsOf(t, clients, port)
	moved, movedElsewhere := 0, 0
	for i := range before {
		if added[i] != before[i] {
			moved++
			if added[i] != backends[10].Name {
				movedElsewhere++
			}
		}
	}
	// The clients that move are those of the new backend's eleventh of the
	// table, binomial over these fixed clients (45 ± 6.4), plus Maglev's
	// own disruption, under 1% of the others.
	if limit := clients/11.0 + 3.5*math.Sqrt(clients*(1.0/11)*(10.0/11)); float64(moved-movedElsewhere) > limit {
		t.Errorf("adding a backend moved %d of %d clients to it (want <= %.0f)", moved-movedElsewhere, clients, limit)
	}
	if float64(movedElsewhere) >= 0.01*clients {
		t.Errorf("adding a backend moved %d of %d clients elsewhere (want < 1%%)", movedElsewhere, clients)
	}
	t.Logf("remove: %d/%d others moved; add: %d/%d moved (%d not to the new backend)", movedOthers, others, moved, clients, movedElsewhere)
}

func TestEstablishedConnectionSurvivesPoolChange(t *testing.T) {
	backends := startBackends(t, 3, 9004)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends))
	name, c, err := backendOf(clientIP(1), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rest []*backendServer
	for _, b := range backends {
		if b.Name != name {
			rest = append(rest, b)
		}
	}
	p.apply(t, rule("web", port, rest))
	// The flow's backend left the pool; the connection still echoes through it.
	echo(t, c, "still here")
	if got := mustBackendOf(t, clientIP(1), port); got == name {
		t.Errorf("a new connection still went to removed backend %s", name)
	}
}

// echo writes msg on c and expects it back.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if string(buf) != msg {
		t.Fatalf("echo = %q, want %q", buf, msg)
	}
}

func TestHalfCloseIsPropagated(t *testing.T) {
	backends := startBackends(t, 1, 9005)
	for _, tc := range []struct {
		name         string
		offloadAfter int
	}{{"on the loops", 1 << 40}, {"on copiers", offloadSoon}} {
		t.Run(tc.name, func(t *testing.T) {
			port := freePort(t)
			p := newProxy(t, Options{offloadAfter: tc.offloadAfter})
			p.apply(t, rule("web", port, backends))
			c, err := dialFrom(clientIP(3), port)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			if _, err := r.ReadString('\n'); err != nil {
				t.Fatal(err)
			}
			// Our FIN reaches the backend, which finishes its echo and
			// closes: we read every byte back, then EOF.
			payload := strings.Repeat("x", 8<<20)
			wrote := make(chan error, 1)
			go func() {
				if _, err := io.WriteString(c, payload); err != nil {
					wrote <- err
					return
				}
				wrote <- c.CloseWrite()
			}()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			if len(got) != len(payload) {
				t.Fatalf("echoed %d bytes after half-close, want %d", len(got), len(payload))
			}
			if n := copierOffloads(p); (tc.offloadAfter == offloadSoon) != (n > 0) {
				t.Fatalf("%d directions went to copiers", n)
			}
		})
	}
}

func TestIdleTimeout(t *testing.T) {
	backends := startBackends(t, 1, 9006)
	for _, reset := range []bool{false, true} {
		name := map[bool]string{false: "orderly close", true: "TCP reset"}[reset]
		t.Run(name, func(t *testing.T) {
			port := freePort(t)
			p := newProxy(t, Options{})
			p.apply(t, rule("web", port, backends, func(r *snapshot.Rule) {
				r.IdleTimeout = 300 * time.Millisecond
				r.TCPReset = reset
			}))
			_, c, err := backendOf(clientIP(4), port)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// Activity keeps the flow open past the timeout.
			for range 4 {
				time.Sleep(150 * time.Millisecond)
				echo(t, c, "ping")
			}
			start := time.Now()
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = c.Read(make([]byte, 1))
			waited := time.Since(start)
			if reset {
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("idle flow with TCP reset: read error %v, want connection reset", err)
				}
			} else if err != io.EOF {
				t.Fatalf("idle flow without TCP reset: read error %v, want EOF", err)
			}
			if waited < 250*time.Millisecond || waited > 2*time.Second {
				t.Errorf("closed after %v of idleness, want about 300ms", waited)
			}
			if got := p.counter(p.metrics.idleTimeouts.WithLabelValues("default/web")); got != 1 {
				t.Errorf("idle_timeouts_total = %v, want 1", got)
			}
		})
	}
}

func TestConnectionLimits(t *testing.T) {
	backends := startBackends(t, 2, 9007)
	port := freePort(t)
	p := newProxy(t, Options{MaxConnectionsPerClient: 3, MaxConnections: 5})
	p.apply(t, rule("web", port, backends))

	var held []*net.TCPConn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 3 {
		_, c, err := backendOf(clientIP(10), port)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	if _, _, err := backendOf(clientIP(10), port); err == nil {
		t.Fatal("a 4th connection from one client IP was served; cap is 3")
	}
	for i := range 2 {
		_, c, err := backendOf(clientIP(11+i), port)
		if err != nil {
			t.Fatalf("another client refused below the global cap: %v", err)
		}
		held = append(held, c)
	}
	if _, _, err := backendOf(clientIP(20), port); err == nil {
		t.Fatal("a 6th connection was served; global cap is 5")
	}
	for _, c := range held {
		echo(t, c, "unaffected")
	}
	rm := p.metrics.refused
	if got := p.counter(rm.WithLabelValues("default/web", refusedClientLimit)); got != 1 {
		t.Errorf("refused{client_limit} = %v, want 1", got)
	}
	if got := p.counter(rm.WithLabelValues("default/web", refusedGlobalLimit)); got != 1 {
		t.Errorf("refused{global_limit} = %v, want 1", got)
	}
	// Closing frees the slots.
	held[0].Close()
	eventually(t, 2*time.Second, "slot freed", func() bool {
		_, c, err := backendOf(clientIP(10), port)
		if err == nil {
			held[0] = c
		}
		return err == nil
	})
}

func TestDialFailureRetriesNextBackend(t *testing.T) {
	backends := startBackends(t, 3, 9008)
	port := freePort(t)
	p := newProxy(t, Options{DialTimeout: time.Second})
	p.apply(t, rule("web", port, backends))
	before := backendsOf(t, 60, port)
	dead := backends[0]
	dead.Stop() // still in the pool, but refuses connections
	after := backendsOf(t, 60, port)
	retried := 0
	for i := range before {
		if before[i] == dead.Name {
			retried++
			if after[i] == dead.Name {
				t.Errorf("%s served by a dead backend", clientIP(i))
			}
		} else if after[i] != before[i] {
			t.Errorf("%s moved from %s to %s though its backend is up", clientIP(i), before[i], after[i])
		}
	}
	if retried == 0 {
		t.Fatal("no client was pinned to the stopped backend")
	}
	if got := p.counter(p.metrics.dialRetries.WithLabelValues("default/web")); got != float64(retried) {
		t.Errorf("dial_retries_total = %v, want %d", got, retried)
	}
}

func TestApplyKeepsConnectionsAndClosesRemovedListeners(t *testing.T) {
	backends := startBackends(t, 2, 9009)
	port, port2 := freePort(t), freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends), rule("other", port2, backends))
	_, c, err := backendOf(clientIP(5), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Change the rule (new idle timeout) and drop the other one.
	p.apply(t, rule("web", port, backends, func(r *snapshot.Rule) { r.IdleTimeout = time.Hour }))
	echo(t, c, "survived the swap")
	if _, err := dialFrom(clientIP(5), port2); err == nil {
		t.Fatal("the removed rule's listener still accepts")
	}
	if v := p.Version(); v != 2 {
		t.Errorf("Version() = %d, want 2", v)
	}
	// A port taken by someone else fails that rule only, and Apply retries it.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	busyPort := uint16(busy.Addr().(*net.TCPAddr).Port)
	s := &snapshot.Snapshot{Version: 3, Rules: []snapshot.Rule{rule("web", port, backends), rule("blocked", busyPort, backends)}}
	s.Normalize()
	failed, err := p.Apply(s)
	if err != nil || failed["default/blocked"] == nil || len(failed) != 1 {
		t.Fatalf("Apply with a busy port: failed=%v err=%v", failed, err)
	}
	busy.Close()
	s.Version = 4
	if failed, err := p.Apply(s); err != nil || len(failed) != 0 {
		t.Fatalf("retry after the port freed: failed=%v err=%v", failed, err)
	}
	mustBackendOf(t, clientIP(6), busyPort)
}

func TestShutdownDrainsThenCloses(t *testing.T) {
	backends := startBackends(t, 1, 9010)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends))
	_, c, err := backendOf(clientIP(8), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- p.Shutdown(ctx)
	}()
	eventually(t, 2*time.Second, "listener closed", func() bool {
		c2, err := dialFrom(clientIP(9), port)
		if err == nil {
			c2.Close()
		}
		return err != nil
	})
	echo(t, c, "draining") // the established flow still works
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown after the last flow ended: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Shutdown did not return after the last flow closed")
	}

	// A flow that never ends is closed when the drain timeout passes.
	p2 := newProxy(t, Options{})
	port2 := freePort(t)
	p2.apply(t, rule("web", port2, backends))
	_, c3, err := backendOf(clientIP(8), port2)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := p2.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown with a live flow: %v, want deadline exceeded", err)
	}
	_ = c3.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c3.Read(make([]byte, 1)); err == nil {
		t.Fatal("flow still open after the drain timeout")
	}
}
