package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/internal/testbackend"
)

func withProxyProtocol(v snapshot.ProxyProtocol) ruleOpt {
	return func(r *snapshot.Rule) { r.ProxyProtocol = v }
}

func headerServers(t *testing.T, n int, port uint16) []*backendServer {
	var out []*backendServer
	for i := range n {
		out = append(out, testbackend.StartHeaderServer(t, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}), port)))
	}
	return out
}

// seenAs is testbackend.SeenAs, failing the test on error.
func seenAs(t *testing.T, src netip.Addr, front netip.AddrPort) (backend, client, dest string, local netip.AddrPort, c *net.TCPConn) {
	t.Helper()
	backend, client, dest, local, c, err := testbackend.SeenAs(src, front)
	if err != nil {
		t.Fatal(err)
	}
	return backend, client, dest, local, c
}

// Through the frontend, every client appears at its backend as itself,
// with its own source port, and the destination is the frontend it reached.
func TestBackendsSeeTheClient(t *testing.T) {
	for _, v := range []snapshot.ProxyProtocol{snapshot.ProxyV1, snapshot.ProxyV2} {
		t.Run(v.String()+"/IPv4", func(t *testing.T) {
			backends := headerServers(t, 3, freePort(t))
			port := freePort(t)
			p := newProxy(t, Options{})
			p.apply(t, rule("web", port, backends, withProxyProtocol(v)))
			reached := map[string]bool{}
			for i := range 100 {
				name, client, dest, local, c := seenAs(t, clientIP(i), frontend(port))
				c.Close()
				reached[name] = true
				if client != local.String() {
					t.Fatalf("client %s appeared at %s as %s", local, name, client)
				}
				if dest != frontend(port).String() {
					t.Fatalf("destination %s, want the frontend %s", dest, frontend(port))
				}
			}
			if len(reached) != 3 {
				t.Errorf("100 clients reached %v", reached)
			}
		})
		t.Run(v.String()+"/IPv6", func(t *testing.T) {
			ln, err := net.Listen("tcp", "[::1]:0")
			if err != nil {
				t.Skipf("no IPv6 loopback: %v", err)
			}
			ln.Close()
			b := testbackend.StartHeaderServer(t, netip.AddrPortFrom(netip.IPv6Loopback(), freePort(t)))
			port := freePort(t)
			p := newProxy(t, Options{})
			r := rule("web6", port, []*backendServer{b}, withProxyProtocol(v))
			r.Bind = netip.IPv6Loopback()
			p.apply(t, r)
			front := netip.AddrPortFrom(netip.IPv6Loopback(), port)
			for range 20 {
				_, client, dest, local, c := seenAs(t, netip.IPv6Loopback(), front)
				c.Close()
				if client != local.String() || dest != front.String() {
					t.Fatalf("header said %s -> %s, want %s -> %s", client, dest, local, front)
				}
			}
		})
	}
}

// A wildcard frontend reports the address the client actually reached.
func TestWildcardFrontendReportsTheAddressReached(t *testing.T) {
	backends := headerServers(t, 1, freePort(t))
	// A port free on every address, not only on 127.0.0.1.
	l, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	p := newProxy(t, Options{})
	r := rule("any", port, backends, withProxyProtocol(snapshot.ProxyV2))
	r.Bind = netip.IPv4Unspecified()
	p.apply(t, r)
	for _, to := range []string{"127.0.0.1", "127.0.0.7"} {
		front := netip.AddrPortFrom(netip.MustParseAddr(to), port)
		_, _, dest, _, c := seenAs(t, clientIP(1), front)
		c.Close()
		if dest != front.String() {
			t.Errorf("destination %s, want %s", dest, front)
		}
	}
}

// Bulk transfers and half-close behave as without the header, whether the
// client speaks first (the header rides with its bytes) or waits.
func TestHeaderWithBulkAndHalfClose(t *testing.T) {
	backends := headerServers(t, 1, freePort(t))
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("bulk", port, backends, withProxyProtocol(snapshot.ProxyV2)))
	for _, speaksFirst := range []bool{false, true} {
		c, err := net.DialTCP("tcp", &net.TCPAddr{IP: clientIP(5).AsSlice()}, net.TCPAddrFromAddrPort(frontend(port)))
		if err != nil {
			t.Fatal(err)
		}
		payload := strings.Repeat("0123456789abcdef", 1<<19) // 8 MiB
		wrote := make(chan error, 1)
		write := func() {
			if _, err := io.WriteString(c, payload); err != nil {
				wrote <- err
				return
			}
			wrote <- c.CloseWrite()
		}
		if speaksFirst {
			go write()
		}
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(line, c.LocalAddr().String()) {
			t.Errorf("backend saw %q, want the client %s", line, c.LocalAddr())
		}
		if !speaksFirst {
			go write()
		}
		got, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		if string(got) != payload {
			t.Fatalf("speaks first %v: echoed %d bytes after half-close, want %d intact", speaksFirst, len(got), len(payload))
		}
		c.Close()
	}
	with := p.counter(p.metrics.headers.WithLabelValues("default/bulk", "with"))
	alone := p.counter(p.metrics.headers.WithLabelValues("default/bulk", "alone"))
	if with+alone != 2 || alone < 1 {
		t.Errorf("headers with data %v, alone %v; want 2 in all, the silent client's alone", with, alone)
	}
}

// Changing a rule from None to V2 applies to new connections; one already
// open goes on without a header.
func TestProxyProtocolChangeAppliesToNewConnections(t *testing.T) {
	plain := startBackends(t, 1, 9061)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, plain))
	name, old, err := backendOf(clientIP(9), port)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if name != plain[0].Name {
		t.Fatalf("reached %s", name)
	}
	echo(t, old, "before")

	// The same backend address now behind a header-requiring server.
	hdr := testbackend.StartHeaderServer(t, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, 9}), 9062))
	p.apply(t, rule("web", port, []*backendServer{hdr}, withProxyProtocol(snapshot.ProxyV2)))
	echo(t, old, "still plain")
	_, client, _, local, c := seenAs(t, clientIP(10), frontend(port))
	c.Close()
	if client != local.String() {
		t.Errorf("new connection appeared as %s, want %s", client, local)
	}
}

// A backend that takes the connection and fails before the header is
// written counts as a failed dial: the client's next backend gets the
// header and the client's bytes. (A backend that resets just after it took
// them cannot be told apart from one that read them: that client is
// closed, as without the header.)
func TestHeaderWriteFailureRetriesNextBackend(t *testing.T) {
	port := freePort(t)
	// A backend that resets every connection as soon as it is accepted.
	rst, err := net.Listen("tcp", "127.0.1.20:0")
	if err != nil {
		t.Fatal(err)
	}
	defer rst.Close()
	go func() {
		for {
			c, err := rst.Accept()
			if err != nil {
				return
			}
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	}()
	good := testbackend.StartHeaderServer(t, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 1, 21}), freePort(t)))
	bad := netip.MustParseAddrPort(rst.Addr().String())
	p := newProxy(t, Options{})
	p.apply(t, rule("retry", port, []*backendServer{{Name: "bad", Addr: bad}, good}, withProxyProtocol(snapshot.ProxyV1), persistence(snapshot.PersistenceNone)))
	// Which connections the resetting backend gets, and whether it resets
	// before or after the header is written, is up to timing: go on until
	// some header writes failed, then check every outcome adds up.
	failures := func() float64 {
		return p.counter(p.metrics.dialFailures.WithLabelValues("default/retry", bad.String()))
	}
	syn := func(b netip.AddrPort) float64 {
		return p.counter(p.metrics.syn.WithLabelValues("default/retry", b.String()))
	}
	served, closed, total := 0, 0, 0
	for i := 0; i < 1000 && (i < 40 || failures() < 3); i++ {
		total++
		c, err := dialFrom(clientIP(i%500), port)
		if err != nil {
			t.Fatal(err)
		}
		// Speak first, so that the bytes ride with the header.
		fmt.Fprintf(c, "hello %d\n", i)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		switch {
		case err == nil && strings.HasPrefix(line, good.Name):
			if back, err := r.ReadString('\n'); err != nil || back != fmt.Sprintf("hello %d\n", i) {
				t.Errorf("connection %d: echo %q, %v", i, back, err)
			}
			served++
		case err != nil && !os.IsTimeout(err):
			closed++
		default:
			t.Fatalf("connection %d: %q, %v", i, line, err)
		}
		c.Close()
	}
	t.Logf("%d connections: %d served (%v of them after a failed header write), %d closed after the backend reset them", total, served, failures(), closed)
	if failures() == 0 {
		t.Fatalf("no header write failed in %d connections: the test proves nothing", total)
	}
	// Every connection the good backend took was served, and only those
	// the resetting one took (after the header went out) were closed: the
	// ones whose header write failed went on to the good backend.
	eventually(t, 5*time.Second, "the metrics settle", func() bool {
		return float64(served) == syn(good.Addr) && float64(closed) == syn(bad)
	})
	if served+closed != total {
		t.Errorf("%d served + %d closed of %d", served, closed, total)
	}
}
