// Command backend is the backend pod of the test cluster: a TCP and UDP
// server that names itself, with an HTTP health endpoint.
//
//	backend [-port 8080] [-health-port 8081] [-shutdown-delay 5s] [-bind ADDR]
//
// TCP on -port is line based: a line "ID" is answered with the pod's name
// and a newline; every other line is echoed back as it came. A UDP datagram
// "ID" on the same port is answered with the pod's name; every other
// datagram is echoed. GET /healthz on -health-port answers 200 "ok".
// The pod's name is $POD_NAME, else the host name.
//
// On SIGTERM or SIGINT it goes on serving everything for -shutdown-delay,
// as a backend should until its endpoint is marked terminating everywhere,
// then closes its listeners, waits up to 10 seconds for open TCP
// connections to end and exits 0. Each event is one line on stderr.
//
// It runs as uid 65532 with no capabilities, so its ports must be 1024 or
// above.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// drainTimeout is how long open TCP connections may take to end after the
// listeners close.
const drainTimeout = 10 * time.Second

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("backend", flag.ContinueOnError)
	fs.SetOutput(stderr)
	port := fs.Int("port", 8080, "TCP and UDP port of the ID/echo service (1024 or above: no capabilities)")
	healthPort := fs.Int("health-port", 8081, "HTTP port of GET /healthz")
	delay := fs.Duration("shutdown-delay", 5*time.Second, "how long to keep serving after SIGTERM before closing the listeners")
	bind := fs.String("bind", "", "address to listen on (default: all)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	logger := log.New(stderr, "backend: ", log.Ldate|log.Ltime|log.Lmicroseconds|log.LUTC)

	name := os.Getenv("POD_NAME")
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			logger.Printf("no POD_NAME and no host name: %v", err)
			return 1
		}
		name = h
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	s, err := listen(logger, name, *bind, *port, *healthPort)
	if err != nil {
		logger.Print(err)
		return 1
	}
	logger.Printf("serving as %q: tcp and udp on %s, GET /healthz on %s",
		name, s.tcp.Addr(), s.healthLn.Addr())

	sig := <-sigs
	logger.Printf("got %v: serving for %v more", sig, *delay)
	time.Sleep(*delay)
	s.closeListeners()
	logger.Printf("listeners closed; waiting up to %v for %d open TCP connections", drainTimeout, s.open())
	if s.drain(drainTimeout) {
		logger.Print("all TCP connections ended; exiting")
	} else {
		logger.Printf("%d TCP connections still open after %v; exiting", s.open(), drainTimeout)
	}
	return 0
}

// server is the running TCP, UDP and HTTP services.
type server struct {
	log      *log.Logger
	idLine   []byte // name + "\n"
	name     []byte
	tcp      net.Listener
	udp      *net.UDPConn
	healthLn net.Listener
	health   *http.Server

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup // one per open TCP connection
	done  sync.WaitGroup // the accept, UDP and HTTP loops

	udpPeers map[string]struct{} // sources seen, for logging the first datagram of each
}

// maxLoggedUDPPeers bounds the memory spent on logging new UDP sources.
const maxLoggedUDPPeers = 10000

func listen(logger *log.Logger, name, bind string, port, healthPort int) (*server, error) {
	s := &server{
		log:      logger,
		name:     []byte(name),
		idLine:   []byte(name + "\n"),
		conns:    map[net.Conn]struct{}{},
		udpPeers: map[string]struct{}{},
	}
	addr := net.JoinHostPort(bind, strconv.Itoa(port))
	var err error
	if s.tcp, err = net.Listen("tcp", addr); err != nil {
		return nil, fmt.Errorf("tcp: %w", err)
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		s.tcp.Close()
		return nil, fmt.Errorf("udp: %w", err)
	}
	if s.udp, err = net.ListenUDP("udp", ua); err != nil {
		s.tcp.Close()
		return nil, fmt.Errorf("udp: %w", err)
	}
	if s.healthLn, err = net.Listen("tcp", net.JoinHostPort(bind, strconv.Itoa(healthPort))); err != nil {
		s.tcp.Close()
		s.udp.Close()
		return nil, fmt.Errorf("health: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok")
	})
	s.health = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	s.done.Add(3)
	go func() { defer s.done.Done(); s.serveTCP() }()
	go func() { defer s.done.Done(); s.serveUDP() }()
	go func() {
		defer s.done.Done()
		if err := s.health.Serve(s.healthLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Printf("health: %v", err)
		}
	}()
	return s, nil
}

func (s *server) serveTCP() {
	for {
		c, err := s.tcp.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Printf("tcp accept: %v", err) // e.g. out of file descriptors
			time.Sleep(50 * time.Millisecond)
			continue
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(c)
	}
}

// handle answers one TCP connection line by line until the client closes
// it. Long lines are echoed in pieces, so any byte stream is echoed whole.
func (s *server) handle(c net.Conn) {
	start := time.Now()
	peer := c.RemoteAddr().String()
	s.log.Printf("tcp %s: open", peer)
	var in, out int64
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.log.Printf("tcp %s: closed after %v, %d bytes in, %d out", peer, time.Since(start).Round(time.Millisecond), in, out)
		s.wg.Done()
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	atLineStart := true
	for {
		chunk, err := r.ReadSlice('\n')
		if len(chunk) > 0 {
			in += int64(len(chunk))
			reply := chunk
			if atLineStart && isID(chunk) && !errors.Is(err, bufio.ErrBufferFull) {
				reply = s.idLine
			}
			n, werr := c.Write(reply)
			out += int64(n)
			if werr != nil {
				return
			}
		}
		switch {
		case err == nil:
			atLineStart = true
		case errors.Is(err, bufio.ErrBufferFull):
			atLineStart = false
		default:
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Printf("tcp %s: %v", peer, err)
			}
			return
		}
	}
}

// isID reports whether a line (with or without its line ending) is "ID".
func isID(line []byte) bool {
	return string(bytes.TrimRight(line, "\r\n")) == "ID"
}

func (s *server) serveUDP() {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := s.udp.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Printf("udp read: %v", err)
			continue
		}
		reply := buf[:n]
		if isID(reply) {
			reply = s.name
		}
		if len(s.udpPeers) < maxLoggedUDPPeers {
			if _, seen := s.udpPeers[from.String()]; !seen {
				s.udpPeers[from.String()] = struct{}{}
				s.log.Printf("udp %s: first datagram", from)
			}
		}
		if _, err := s.udp.WriteToUDPAddrPort(reply, from); err != nil {
			s.log.Printf("udp %s: %v", from, err)
		}
	}
}

// closeListeners stops accepting TCP connections, UDP datagrams and health
// checks. Open TCP connections go on.
func (s *server) closeListeners() {
	s.tcp.Close()
	s.udp.Close()
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	s.health.Shutdown(ctx) // closes its listener, then waits for requests in flight
	s.done.Wait()
}

func (s *server) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// drain waits up to timeout for open TCP connections to end and reports
// whether they all did.
func (s *server) drain(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}
