// Package testbackend provides real servers and clients on loopback for
// tests: backends on 127.0.1.x that name themselves, and clients bound to
// distinct source IPs from 127.0.2.1 on.
package testbackend

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// ClientIP returns the i-th test client address, from 127.0.2.1 on
// (250 per /24: 127.0.2.1–127.0.2.250, 127.0.3.1, ...).
func ClientIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 0, byte(2 + i/250), byte(1 + i%250)})
}

// Server is a TCP and UDP server that names itself: a TCP connection first
// receives "name\n" and then an echo; a UDP datagram is answered with "name".
type Server struct {
	Name string
	Addr netip.AddrPort
	// Healthy is what its HTTP health endpoint answers (200 or 503).
	Healthy atomic.Bool
	tcp     net.Listener
	udp     *net.UDPConn
	health  *http.Server
}

// Listen runs a Server on ip:port until Stop.
func Listen(ip string, port uint16) (*Server, error) {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return nil, err
	}
	b := &Server{Name: ip, Addr: netip.AddrPortFrom(addr, port)}
	b.Healthy.Store(true)
	if b.tcp, err = net.Listen("tcp", b.Addr.String()); err != nil {
		return nil, err
	}
	if b.udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(b.Addr)); err != nil {
		b.tcp.Close()
		return nil, err
	}
	go b.serveTCP()
	go b.serveUDP()
	return b, nil
}

// Start runs a Server on ip:port until the test ends.
func Start(t testing.TB, ip string, port uint16) *Server {
	t.Helper()
	b, err := Listen(ip, port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Stop)
	return b
}

// StartN runs n Servers on 127.0.1.1 … 127.0.1.n, all on port.
func StartN(t testing.TB, n int, port uint16) []*Server {
	t.Helper()
	return StartAt(t, n, port, func(i int) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 1, byte(i + 1)}) })
}

// StartAt runs n Servers on ip(0) … ip(n-1), all on port.
func StartAt(t testing.TB, n int, port uint16, ip func(int) netip.Addr) []*Server {
	t.Helper()
	out := make([]*Server, n)
	for i := range out {
		out[i] = Start(t, ip(i).String(), port)
	}
	return out
}

func (b *Server) serveTCP() {
	for {
		c, err := b.tcp.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "%s\n", b.Name)
			_, _ = io.Copy(c, c)
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
		}()
	}
}

func (b *Server) serveUDP() {
	buf := make([]byte, 2048)
	for {
		_, from, err := b.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		_, _ = b.udp.WriteToUDPAddrPort([]byte(b.Name), from)
	}
}

// ServeHealth answers GET /healthz on port with 200 or 503 per b.Healthy.
func (b *Server) ServeHealth(t testing.TB, port uint16) {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(b.Addr.Addr(), port).String())
	if err != nil {
		t.Fatal(err)
	}
	b.health = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" && b.Healthy.Load() {
			w.WriteHeader(http.StatusOK)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	})}
	go func() { _ = b.health.Serve(ln) }()
}

// Stop closes the server's sockets: new connections are refused.
func (b *Server) Stop() {
	_ = b.tcp.Close()
	_ = b.udp.Close()
	if b.health != nil {
		_ = b.health.Close()
	}
}

// Dial connects from the client address src to frontend.
func Dial(src netip.Addr, frontend netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", frontend.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// BackendOf connects from src and returns the name the backend announces and
// the open connection.
func BackendOf(src netip.Addr, frontend netip.AddrPort) (string, *net.TCPConn, error) {
	c, err := Dial(src, frontend)
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

// MustBackendOf is BackendOf that closes the connection and fails the test on error.
func MustBackendOf(t testing.TB, src netip.Addr, frontend netip.AddrPort) string {
	t.Helper()
	name, c, err := BackendOf(src, frontend)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return name
}

// Pins maps each of n clients (ClientIP(0) …) to its backend.
func Pins(t testing.TB, n int, frontend netip.AddrPort) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		out[i] = MustBackendOf(t, ClientIP(i), frontend)
	}
	return out
}

// UDPClient is a UDP socket from src connected to frontend, closed when the test ends.
func UDPClient(t testing.TB, src netip.Addr, frontend netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: src.AsSlice()}, net.UDPAddrFromAddrPort(frontend))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// UDPExchange sends one datagram on conn and returns the backend name in the reply.
func UDPExchange(conn *net.UDPConn) (string, error) {
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

// Eventually polls cond until it holds or timeout passes, and returns how long it took.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
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

// FreePort returns a port that is free for TCP and UDP on every one of ips
// (127.0.0.1 when none are given).
func FreePort(t testing.TB, ips ...netip.Addr) uint16 {
	t.Helper()
	if len(ips) == 0 {
		ips = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	}
	for range 100 {
		l, err := net.Listen("tcp", netip.AddrPortFrom(ips[0], 0).String())
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(l.Addr().(*net.TCPAddr).Port)
		l.Close()
		if portFree(ips, port) {
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

func portFree(ips []netip.Addr, port uint16) bool {
	for _, ip := range ips {
		addr := netip.AddrPortFrom(ip, port).String()
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		l.Close()
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		u.Close()
	}
	return true
}
