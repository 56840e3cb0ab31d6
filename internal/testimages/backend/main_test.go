package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary runs the real program when this is set: the tests start
// it as a process, so that SIGTERM and the exit code are the real ones.
const runMainEnv = "STICKYLB_BACKEND_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

// freePort returns a port on 127.0.0.1 free for both TCP and UDP.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(port))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// proc is the backend running as a process, with its log lines.
type proc struct {
	cmd   *exec.Cmd
	lines chan string
	log   strings.Builder // every line seen by waitLog, for failure messages
}

func start(t *testing.T, args ...string) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1", "POD_NAME=backend-test-0")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, lines: make(chan string, 1000)}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return p
}

// waitLog waits for a log line containing s.
func (p *proc) waitLog(t *testing.T, s string, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("backend exited before logging %q; log:\n%s", s, p.log.String())
			}
			p.log.WriteString(l + "\n")
			if strings.Contains(l, s) {
				return time.Now()
			}
		case <-deadline:
			t.Fatalf("no %q logged in %v; log:\n%s", s, timeout, p.log.String())
		}
	}
}

// line sends a line on c and reads one back.
func line(t *testing.T, c net.Conn, r *bufio.Reader, send string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, send+"\n"); err != nil {
		t.Fatal(err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("after sending %q: %v", send, err)
	}
	return strings.TrimSuffix(got, "\n")
}

func datagram(addr, send string) (string, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, send); err != nil {
		return "", err
	}
	buf := make([]byte, 64<<10)
	n, err := c.Read(buf)
	return string(buf[:n]), err
}

func healthz(url string) error {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(b) != "ok" {
		return fmt.Errorf("GET /healthz: %d %q", resp.StatusCode, b)
	}
	return nil
}

func TestServeAndGracefulShutdown(t *testing.T) {
	const delay = time.Second
	port, healthPort := freePort(t), freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	health := "http://127.0.0.1:" + strconv.Itoa(healthPort) + "/healthz"
	p := start(t, "-bind", "127.0.0.1", "-port", strconv.Itoa(port),
		"-health-port", strconv.Itoa(healthPort), "-shutdown-delay", delay.String())
	p.waitLog(t, `serving as "backend-test-0"`, 30*time.Second)

	// TCP: ID and echo, a line longer than the read buffer, CRLF.
	held, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	hr := bufio.NewReader(held)
	if got := line(t, held, hr, "ID"); got != "backend-test-0" {
		t.Errorf("ID: %q", got)
	}
	if got := line(t, held, hr, "hello, backend"); got != "hello, backend" {
		t.Errorf("echo: %q", got)
	}
	long := strings.Repeat("0123456789", 20000) + "ID"
	if got := line(t, held, hr, long); got != long {
		t.Errorf("long line: got %d bytes, want %d echoed", len(got), len(long))
	}
	if got := line(t, held, hr, "ID\r"); got != "backend-test-0" {
		t.Errorf("ID with CRLF: %q", got)
	}

	// UDP on the same port.
	if got, err := datagram(addr, "ID"); err != nil || got != "backend-test-0" {
		t.Errorf("UDP ID: %q %v", got, err)
	}
	if got, err := datagram(addr, "ping 1"); err != nil || got != "ping 1" {
		t.Errorf("UDP echo: %q %v", got, err)
	}
	if err := healthz(health); err != nil {
		t.Error(err)
	}

	// SIGTERM: everything is served for the delay.
	sent := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	p.waitLog(t, "got terminated", 10*time.Second)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("a connection %v after SIGTERM (delay %v): %v", time.Since(sent), delay, err)
	}
	if got := line(t, c, bufio.NewReader(c), "ID"); got != "backend-test-0" {
		t.Errorf("ID after SIGTERM: %q", got)
	}
	c.Close()
	if got, err := datagram(addr, "ID"); err != nil || got != "backend-test-0" {
		t.Errorf("UDP ID after SIGTERM: %q %v", got, err)
	}
	if err := healthz(health); err != nil {
		t.Errorf("after SIGTERM: %v", err)
	}
	if since := time.Since(sent); since >= delay {
		t.Fatalf("the checks during the delay took %v, longer than the delay %v; the machine is too slow for this test", since, delay)
	}

	// Then the listeners close; the open connection is still served.
	closed := p.waitLog(t, "listeners closed", 10*time.Second)
	if d := closed.Sub(sent); d < delay {
		t.Errorf("listeners closed %v after SIGTERM, before the delay %v", d, delay)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("a TCP connection was accepted after the listeners closed")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("TCP after close: %v, want connection refused", err)
	}
	if got, err := datagram(addr, "ID"); err == nil {
		t.Errorf("UDP answered %q after the listeners closed", got)
	}
	if err := healthz(health); err == nil {
		t.Error("/healthz answered after the listeners closed")
	}
	if got := line(t, held, hr, "ID"); got != "backend-test-0" {
		t.Errorf("ID on the open connection while draining: %q", got)
	}
	select {
	case l := <-p.lines:
		if strings.Contains(l, "exiting") {
			t.Errorf("exited with a connection open: %s", l)
		}
		p.log.WriteString(l + "\n")
	case <-time.After(200 * time.Millisecond):
	}

	// The last connection ends: it exits 0.
	held.Close()
	p.waitLog(t, "all TCP connections ended", 10*time.Second)
	done := make(chan error, 1)
	go func() {
		for range p.lines {
		}
		done <- p.cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("exit: %v, want 0", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("did not exit")
	}
}

func TestBadPort(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	p := start(t, "-bind", "127.0.0.1", "-port", port, "-health-port", "0")
	p.waitLog(t, "address already in use", 30*time.Second)
	for range p.lines {
	}
	err = p.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Errorf("exit: %v, want status 1", err)
	}
}
