package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pires/go-proxyproto"
)

// The backends: four addresses, one port, TCP and UDP. A TCP client's first
// byte picks the service, so one rule (one frontend port) serves every test:
//
//	'E' echo: everything after the mode byte comes back
//	'D' discard: reads and drops everything (upload)
//	'S' source: sends zeros until the peer goes away (download)
//
// UDP datagrams are echoed.
//
// The same four addresses serve the same TCP services on a second port,
// where every connection must open with a PROXY protocol v2 header
// (github.com/pires/go-proxyproto, REQUIRE): the targets that send one
// (stickylb-v2, haproxy-v2) go there, the others to the first port. A
// connection without a valid v2 header gets no service: the backend answers
// refusedMark and the reason, then closes, so the client's echo fails and
// counts as a failed connection.
const (
	modeEcho    = 'E'
	modeDiscard = 'D'
	modeSource  = 'S'

	// refusedMark starts the answer of a PROXY v2 backend to a connection
	// without a valid header: the reason follows, then the backend closes.
	refusedMark = '!'

	firstBackendPort = 19000
	bulkBufferSize   = 256 << 10

	// v2HeaderTimeout bounds how long a header-parsing backend waits for
	// the header.
	v2HeaderTimeout = 5 * time.Second
)

var backendIPs = []string{"127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"}

// startBackends runs this binary again with -serve-backends and returns the
// ports the backends listen on: plain, and PROXY v2 header required.
func startBackends() (c *child, plainPort, v2Port int, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, 0, 0, fmt.Errorf("find the driver's own binary: %w", err)
	}
	c = newChild("backends", self, "-serve-backends")
	// The backends exit when this pipe closes, even if the driver is killed.
	if _, err := c.cmd.StdinPipe(); err != nil {
		return nil, 0, 0, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, 0, 0, err
	}
	c.cmd.Stdout = pw
	err = c.start()
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, 0, 0, err
	}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		if sc.Scan() {
			ready <- sc.Text()
		}
		close(ready)
		for sc.Scan() {
			fmt.Fprintln(c.out, sc.Text())
		}
	}()
	select {
	case line, ok := <-ready:
		if plainPort, v2Port, err := parseReady(line); ok && err == nil {
			return c, plainPort, v2Port, nil
		}
	case <-time.After(10 * time.Second):
	}
	c.stop()
	return nil, 0, 0, fmt.Errorf("the backends did not start: %s", c.output())
}

// parseReady reads the backends' "ready PLAIN V2" line.
func parseReady(line string) (plainPort, v2Port int, err error) {
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "ready" {
		return 0, 0, fmt.Errorf("not a ready line: %q", line)
	}
	if plainPort, err = strconv.Atoi(f[1]); err == nil {
		v2Port, err = strconv.Atoi(f[2])
	}
	return plainPort, v2Port, err
}

// serveBackends is the child process: it listens, prints "ready PORT V2PORT",
// and serves until its standard input closes.
func serveBackends() int {
	lns, udps, port, err := listenBackends(firstBackendPort, true)
	if err != nil {
		fmt.Fprintf(os.Stderr, "backends: %v\n", err)
		return 1
	}
	v2lns, _, v2Port, err := listenBackends(port+1, false)
	if err != nil {
		fmt.Fprintf(os.Stderr, "backends (PROXY v2): %v\n", err)
		return 1
	}
	for _, ln := range lns {
		go acceptLoop(ln)
	}
	for _, ln := range v2lns {
		go acceptLoop(v2Listener(ln))
	}
	for _, u := range udps {
		_ = u.SetReadBuffer(4 << 20)
		_ = u.SetWriteBuffer(4 << 20)
		// Two readers per socket so one backend is not capped by one goroutine.
		go echoUDP(u)
		go echoUDP(u)
	}
	fmt.Printf("ready %d %d\n", port, v2Port)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// v2Listener wraps a backend listener so that each connection must open
// with a PROXY protocol v2 header, which it consumes: the services read
// what follows it. The header may carry the PROXY command (a client's
// connection) or LOCAL (a health probe); a v1 header, or none, fails the
// connection's first read.
func v2Listener(ln net.Listener) net.Listener {
	return &proxyproto.Listener{
		Listener: ln,
		ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			return proxyproto.REQUIRE, nil
		},
		ValidateHeader: func(h *proxyproto.Header) error {
			if h.Version != 2 {
				return fmt.Errorf("PROXY protocol version %d, want 2", h.Version)
			}
			return nil
		},
		ReadHeaderTimeout: v2HeaderTimeout,
	}
}

// listenBackends finds the first port from first that is free for TCP (and
// UDP, with udp) on every backend address.
func listenBackends(first int, udp bool) ([]net.Listener, []*net.UDPConn, int, error) {
	var lastErr error
	for port := first; port < first+200; port++ {
		var lns []net.Listener
		var udps []*net.UDPConn
		lastErr = nil
		for _, ip := range backendIPs {
			ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip), Port: port})
			if err != nil {
				lastErr = err
				break
			}
			lns = append(lns, ln)
			if !udp {
				continue
			}
			u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(ip), Port: port})
			if err != nil {
				lastErr = err
				break
			}
			udps = append(udps, u)
		}
		if lastErr == nil {
			return lns, udps, port, nil
		}
		for _, ln := range lns {
			ln.Close()
		}
		for _, u := range udps {
			u.Close()
		}
	}
	return nil, nil, 0, fmt.Errorf("no port from %d free on %v: %w", first, backendIPs, lastErr)
}

func acceptLoop(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of fds or similar: back off instead of spinning.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go serveBackendConn(c)
	}
}

// zeros is what the source service sends; goroutines only read it.
var zeros = make([]byte, bulkBufferSize)

// serveBackendConn serves one connection. On the PROXY v2 port, the first
// read parses the header; without a valid one the backend answers
// refusedMark and the reason instead of any service, and closes.
func serveBackendConn(c net.Conn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		if pc, ok := c.(*proxyproto.Conn); ok && pc.ProxyHeader() == nil {
			// Past the wrapper, which would fail the write the same way.
			_, _ = fmt.Fprintf(pc.Raw(), "%c%v\n", refusedMark, err)
		}
		return
	}
	switch mode[0] {
	case modeEcho:
		echoTCP(c)
	case modeDiscard:
		discardTCP(c)
	case modeSource:
		sourceTCP(c)
	}
}

func echoTCP(c net.Conn) {
	// Small: the idle test holds thousands of these, and echoes are short.
	buf := make([]byte, 4<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func discardTCP(c net.Conn) {
	buf := make([]byte, bulkBufferSize)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

func sourceTCP(c net.Conn) {
	for {
		if _, err := c.Write(zeros); err != nil {
			return
		}
	}
}

func echoUDP(u *net.UDPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		_, _ = u.WriteToUDPAddrPort(buf[:n], from)
	}
}
