package testbackend

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// StartHeaderServer runs, until the test ends, a TCP backend on at behind
// a PROXY protocol listener (a library's, which requires the header, v1 or
// v2). Each connection is first told "name client destination\n", the
// client and destination as the header gave them, and is then echoed,
// half-close included. A connection without a header is closed.
func StartHeaderServer(t testing.TB, at netip.AddrPort) *Server {
	t.Helper()
	raw, err := net.Listen("tcp", at.String())
	if err != nil {
		t.Fatal(err)
	}
	ln := &proxyproto.Listener{Listener: raw, ReadHeaderTimeout: 5 * time.Second}
	s := &Server{Name: at.String(), Addr: at, tcp: ln}
	s.Healthy.Store(true)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveHeader(s.Name, c.(*proxyproto.Conn))
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return s
}

func serveHeader(name string, c *proxyproto.Conn) {
	defer c.Close()
	if c.ProxyHeader() == nil { // reads the header, or fails to
		return
	}
	fmt.Fprintf(c, "%s %s %s\n", name, c.RemoteAddr(), c.LocalAddr())
	_, _ = io.Copy(c, c)
	if tc, ok := c.Raw().(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

// SeenAs connects from src to front and returns what a header server says
// the header told it: its name, the client and the destination, and the
// client's own address. The connection stays open for the caller.
func SeenAs(src netip.Addr, front netip.AddrPort) (backend, client, dest string, local netip.AddrPort, c *net.TCPConn, err error) {
	c, err = net.DialTCP("tcp", &net.TCPAddr{IP: src.AsSlice()}, net.TCPAddrFromAddrPort(front))
	if err != nil {
		return
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		c.Close()
		return "", "", "", netip.AddrPort{}, nil, fmt.Errorf("from %s: %w", src, err)
	}
	f := strings.Fields(line)
	if len(f) != 3 {
		c.Close()
		return "", "", "", netip.AddrPort{}, nil, fmt.Errorf("backend said %q", line)
	}
	return f[0], f[1], f[2], c.LocalAddr().(*net.TCPAddr).AddrPort(), c, nil
}
