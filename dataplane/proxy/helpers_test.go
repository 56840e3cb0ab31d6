package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Tests use real sockets on loopback: backends on 127.0.1.x, the proxy on
// 127.0.0.1 and clients bound to 127.0.2.0 and beyond.

// clientIP returns the i-th test client address, from 127.0.2.1 on.
func clientIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 0, byte(2 + i/250), byte(1 + i%250)})
}

// backendServer is a TCP and UDP server that names itself: a TCP connection
// first receives "name\n" and then an echo; a UDP datagram is answered with
// "name".
type backendServer struct {
	name    string
	addr    netip.AddrPort
	tcp     net.Listener
	udp     *net.UDPConn
	healthy atomic.Bool // what its HTTP health endpoint answers
	health  *http.Server
	conns   sync.WaitGroup
}

func startBackend(t *testing.T, ip string, port uint16) *backendServer {
	t.Helper()
	addr := netip.AddrPortFrom(netip.MustParseAddr(ip), port)
	b := &backendServer{name: ip, addr: addr}
	b.healthy.Store(true)
	var err error
	if b.tcp, err = net.Listen("tcp", addr.String()); err != nil {
		t.Fatal(err)
	}
	if b.udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr)); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := b.tcp.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "%s\n", b.name)
				_, _ = io.Copy(c, c)
				if tc, ok := c.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
			}()
		}
	}()
	go func() {
		buf := make([]byte, 2048)
		for {
			_, from, err := b.udp.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = b.udp.WriteToUDPAddrPort([]byte(b.name), from)
		}
	}()
	t.Cleanup(b.stop)
	return b
}

// serveHealth answers GET /healthz on port with 200 or 503 per b.healthy.
func (b *backendServer) serveHealth(t *testing.T, port uint16) {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(b.addr.Addr(), port).String())
	if err != nil {
		t.Fatal(err)
	}
	b.health = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" && b.healthy.Load() {
			w.WriteHeader(http.StatusOK)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	})}
	go func() { _ = b.health.Serve(ln) }()
}

func (b *backendServer) stop() {
	_ = b.tcp.Close()
	_ = b.udp.Close()
	if b.health != nil {
		_ = b.health.Close()
	}
}

func startBackends(t *testing.T, n int, port uint16) []*backendServer {
	t.Helper()
	out := make([]*backendServer, n)
	for i := range out {
		out[i] = startBackend(t, fmt.Sprintf("127.0.1.%d", i+1), port)
	}
	return out
}

// freePort returns a port free on 127.0.0.1 for both TCP and UDP.
func freePort(t *testing.T) uint16 {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

type ruleOpt func(*snapshot.Rule)

func rule(name string, port uint16, backends []*backendServer, opts ...ruleOpt) snapshot.Rule {
	r := snapshot.Rule{
		Name: "default/" + name, Frontend: "default/default", Bind: netip.MustParseAddr("127.0.0.1"), Port: port,
		Protocols: []snapshot.Protocol{snapshot.TCP}, Persistence: snapshot.PersistenceClientIP,
		IdleTimeout: 4 * time.Minute,
	}
	for _, b := range backends {
		r.Backends = append(r.Backends, snapshot.Backend{Addr: b.addr})
	}
	for _, o := range opts {
		o(&r)
	}
	return r
}

func protocols(p ...snapshot.Protocol) ruleOpt {
	return func(r *snapshot.Rule) { r.Protocols = p }
}

func persistence(p snapshot.Persistence) ruleOpt {
	return func(r *snapshot.Rule) { r.Persistence = p }
}

type testProxy struct {
	*Proxy
	reg     *prometheus.Registry
	version uint64
}

func newProxy(t *testing.T, opts Options) *testProxy {
	t.Helper()
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return &testProxy{Proxy: p, reg: reg}
}

// apply serves the rules as the next snapshot version.
func (p *testProxy) apply(t *testing.T, rules ...snapshot.Rule) {
	t.Helper()
	p.version++
	s := &snapshot.Snapshot{Version: p.version, Rules: rules}
	s.Normalize()
	failed, err := p.Apply(s)
	if err != nil {
		t.Fatal(err)
	}
	for name, err := range failed {
		t.Fatalf("rule %s: %v", name, err)
	}
}

// counter reads a metric series' value.
func (p *testProxy) counter(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

// dialFrom connects from the client address src to the proxy port.
func dialFrom(src netip.Addr, port uint16) (*net.TCPConn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// backendOf connects from src and returns the name the backend announces,
// keeping the connection open when keep is set.
func backendOf(src netip.Addr, port uint16) (string, *net.TCPConn, error) {
	c, err := dialFrom(src, port)
	if err != nil {
		return "", nil, err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		return "", nil, fmt.Errorf("from %s: %w", src, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return strings.TrimSpace(line), c, nil
}

func mustBackendOf(t *testing.T, src netip.Addr, port uint16) string {
	t.Helper()
	name, c, err := backendOf(src, port)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return name
}

// udpBackendOf sends one datagram from src (a fresh socket, or conn) and
// returns the name in the reply.
func udpExchange(t *testing.T, conn *net.UDPConn) (string, error) {
	t.Helper()
	if _, err := conn.Write([]byte("ping")); err != nil {
		return "", err
	}
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func udpClient(t *testing.T, src netip.Addr, port uint16) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: src.AsSlice()}, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}
