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
)

// The backends: four addresses, one port, TCP and UDP. A TCP client's first
// byte picks the service, so one rule (one frontend port) serves every test:
//
//	'E' echo: everything after the mode byte comes back
//	'D' discard: reads and drops everything (upload)
//	'S' source: sends zeros until the peer goes away (download)
//
// UDP datagrams are echoed.
const (
	modeEcho    = 'E'
	modeDiscard = 'D'
	modeSource  = 'S'

	firstBackendPort = 19000
	bulkBufferSize   = 256 << 10
)

var backendIPs = []string{"127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"}

// startBackends runs this binary again with -serve-backends and returns the
// port the backends listen on.
func startBackends() (*child, int, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, 0, fmt.Errorf("find the driver's own binary: %w", err)
	}
	c := newChild("backends", self, "-serve-backends")
	// The backends exit when this pipe closes, even if the driver is killed.
	if _, err := c.cmd.StdinPipe(); err != nil {
		return nil, 0, err
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, 0, err
	}
	c.cmd.Stdout = pw
	err = c.start()
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, 0, err
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
		port, err := strconv.Atoi(strings.TrimPrefix(line, "ready "))
		if ok && err == nil {
			return c, port, nil
		}
	case <-time.After(10 * time.Second):
	}
	c.stop()
	return nil, 0, fmt.Errorf("the backends did not start: %s", c.output())
}

// serveBackends is the child process: it listens, prints "ready PORT", and
// serves until its standard input closes.
func serveBackends() int {
	lns, udps, port, err := listenBackends()
	if err != nil {
		fmt.Fprintf(os.Stderr, "backends: %v\n", err)
		return 1
	}
	for _, ln := range lns {
		go acceptLoop(ln)
	}
	for _, u := range udps {
		_ = u.SetReadBuffer(4 << 20)
		_ = u.SetWriteBuffer(4 << 20)
		// Two readers per socket so one backend is not capped by one goroutine.
		go echoUDP(u)
		go echoUDP(u)
	}
	fmt.Printf("ready %d\n", port)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// listenBackends finds the first port from firstBackendPort that is free for
// TCP and UDP on every backend address.
func listenBackends() ([]*net.TCPListener, []*net.UDPConn, int, error) {
	var lastErr error
	for port := firstBackendPort; port < firstBackendPort+200; port++ {
		var lns []*net.TCPListener
		var udps []*net.UDPConn
		lastErr = nil
		for _, ip := range backendIPs {
			ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip), Port: port})
			if err != nil {
				lastErr = err
				break
			}
			lns = append(lns, ln)
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
	return nil, nil, 0, fmt.Errorf("no port from %d free on %v: %w", firstBackendPort, backendIPs, lastErr)
}

func acceptLoop(ln *net.TCPListener) {
	for {
		c, err := ln.AcceptTCP()
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

func serveBackendConn(c *net.TCPConn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
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

func echoTCP(c *net.TCPConn) {
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

func discardTCP(c *net.TCPConn) {
	buf := make([]byte, bulkBufferSize)
	for {
		if _, err := c.Read(buf); err != nil {
			return
		}
	}
}

func sourceTCP(c *net.TCPConn) {
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
