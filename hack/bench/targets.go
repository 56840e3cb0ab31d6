package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	targetDirect   = "direct"
	targetStickylb = "stickylb" // the rule as users write it: pins on (sessionPersistenceTimeoutInMinutes unset, 180)
	targetNoPins   = "stickylb-nopins"
	targetHAProxy  = "haproxy"
	// The PROXY protocol v2 targets: the stickylb rule with proxyProtocol: V2
	// and HAProxy with send-proxy-v2, both over the backends' second port,
	// where every connection must open with a v2 header.
	targetV2        = "stickylb-v2"
	targetHAProxyV2 = "haproxy-v2"
	// targetNginx is nginx's stream module, the UDP peer (issue 16): it
	// takes part in the UDP tests only.
	targetNginx = "nginx"

	// noPinsTest is the one test the stickylb-nopins target takes part in:
	// the cost of pins is the cost of a new flow, and the other tests open
	// a few long connections, where pins cannot show.
	noPinsTest = "connections"
	// v2Test is the one test the PROXY v2 targets take part in: the header
	// is a cost per connection, which the other tests (a few long
	// connections each) cannot show.
	v2Test = "connections"

	// Frontend ports are searched upward from here, below the ephemeral range
	// so that no outgoing connection's source port can take them.
	stickylbFirstPort = 18080
	haproxyFirstPort  = 18090
	nginxFirstPort    = 18100

	startTimeout = 5 * time.Second
	stopTimeout  = 10 * time.Second
)

// A target is one way of reaching the backends.
type target struct {
	name        string
	bin         string
	unavailable string // why the column is empty; "" when usable
	only        string // the one test this target takes part in; "" for all
	udpOnly     bool   // takes part in the UDP tests only
}

// A session is a running target: fresh for each test, so no test inherits
// another's heap, connections or TIME_WAIT state.
type session struct {
	proxy *child // nil for the direct target
	tcp   func(client int) string
	udp   func(client int) string
}

func (s *session) pid() int {
	if s.proxy == nil {
		return 0
	}
	return s.proxy.cmd.Process.Pid
}

func directSession(backendPort int) *session {
	addr := func(client int) string {
		return net.JoinHostPort(backendIPs[client%len(backendIPs)], strconv.Itoa(backendPort))
	}
	return &session{tcp: addr, udp: addr}
}

func proxySession(c *child, port int) *session {
	addr := func(int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
	return &session{proxy: c, tcp: addr, udp: addr}
}

func (r *runner) stickylbTarget() *target {
	t := &target{name: targetStickylb, bin: r.stickylb}
	if t.bin == "" {
		t.unavailable = "not requested (-stickylb \"\")"
	} else if _, err := os.Stat(t.bin); err != nil {
		t.unavailable = err.Error()
	}
	return t
}

// noPinsTarget is the stickylb binary again, its rule with
// sessionPersistenceTimeoutInMinutes: 0 (no pins, Maglev only), measured
// back to back with the stickylb target in the short-connections test only.
func (r *runner) noPinsTarget() *target {
	t := r.stickylbTarget()
	t.name, t.only = targetNoPins, noPinsTest
	return t
}

// v2Target is the stickylb binary again, its rule with proxyProtocol: V2
// and the header-parsing backends, in the short-connections test only.
func (r *runner) v2Target() *target {
	t := r.stickylbTarget()
	t.name, t.only = targetV2, v2Test
	return t
}

// haproxyV2Target is HAProxy again, its servers with send-proxy-v2 and the
// header-parsing backends, in the short-connections test only.
func (r *runner) haproxyV2Target() *target {
	t := r.haproxyTarget()
	t.name, t.only = targetHAProxyV2, v2Test
	return t
}

func (r *runner) haproxyTarget() *target {
	t := &target{name: targetHAProxy}
	if r.haproxy == "" {
		t.unavailable = "not requested (-haproxy \"\")"
		return t
	}
	bin, err := exec.LookPath(r.haproxy)
	if err != nil {
		t.unavailable = err.Error()
	}
	t.bin = bin
	return t
}

// nginxTarget is nginx's stream module over the same backends, in the UDP
// tests only.
func (r *runner) nginxTarget() *target {
	t := &target{name: targetNginx, udpOnly: true}
	if r.nginx == "" {
		t.unavailable = "not requested (-nginx \"\")"
		return t
	}
	bin, err := exec.LookPath(r.nginx)
	if err != nil {
		t.unavailable = err.Error()
		return t
	}
	t.bin = bin
	if _, err := nginxStreamModule(bin); err != nil {
		t.unavailable = err.Error()
	}
	return t
}

// start runs the target and waits until its frontend accepts connections.
func (r *runner) start(t *target) (*session, error) {
	switch t.name {
	case targetDirect:
		return directSession(r.backendPort), nil
	case targetStickylb, targetNoPins, targetV2:
		return r.startProxy(t, stickylbFirstPort, func(port int) ([]string, error) {
			rules := filepath.Join(r.tmp, t.name+"-rules.yaml")
			if err := os.WriteFile(rules, []byte(r.rulesYAML(port, t.name != targetNoPins, t.name == targetV2)), 0o644); err != nil {
				return nil, err
			}
			args := []string{"proxy", "--rules", rules, "--bind-address", "127.0.0.1", "--metrics-bind-address", "0"}
			return append(args, strings.Fields(r.extraArgs)...), nil
		}, syscall.SIGTERM)
	case targetHAProxy, targetHAProxyV2:
		return r.startProxy(t, haproxyFirstPort, func(port int) ([]string, error) {
			cfg := filepath.Join(r.tmp, t.name+".cfg")
			if err := os.WriteFile(cfg, []byte(r.haproxyConfig(port, t.name == targetHAProxyV2)), 0o644); err != nil {
				return nil, err
			}
			return []string{"-db", "-f", cfg}, nil
		}, syscall.SIGUSR1) // HAProxy's graceful stop; on SIGTERM it dies of the signal
	case targetNginx:
		return r.startProxy(t, nginxFirstPort, func(port int) ([]string, error) {
			prefix := filepath.Join(r.tmp, "nginx")
			if err := os.MkdirAll(filepath.Join(prefix, "logs"), 0o755); err != nil {
				return nil, err
			}
			cfg, err := r.nginxConfig(t.bin, prefix, port)
			if err != nil {
				return nil, err
			}
			conf := filepath.Join(prefix, "nginx.conf")
			if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
				return nil, err
			}
			// Its own prefix and configuration, in the foreground, logging
			// to stderr from the start: nothing of the system's nginx.
			return []string{"-p", prefix, "-c", conf, "-e", "stderr", "-g", "daemon off;"}, nil
		}, syscall.SIGTERM) // nginx's fast stop: a graceful one (SIGQUIT) waits for every UDP session to time out
	}
	return nil, fmt.Errorf("unknown target %q", t.name)
}

func (r *runner) startProxy(t *target, firstPort int, args func(port int) ([]string, error), stopSignal syscall.Signal) (*session, error) {
	port, err := freePort(firstPort)
	if err != nil {
		return nil, err
	}
	a, err := args(port)
	if err != nil {
		return nil, err
	}
	c := newChild(t.name, t.bin, a...)
	c.stopSignal = stopSignal
	if t.name == targetNginx {
		// nginx's workers are the master's children: a process group lets
		// killChildren take them too.
		c.cmd.SysProcAttr.Setpgid = true
		c.group = true
	}
	if err := c.start(); err != nil {
		return nil, &startError{err}
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := waitAccepting(addr, c, startTimeout); err != nil {
		c.stop()
		return nil, &startError{err}
	}
	return proxySession(c, port), nil
}

// A startError means the target never served: its column is unavailable.
type startError struct{ err error }

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// stop ends a session. A proxy must exit 0 on its stop signal.
func (s *session) stop() error {
	if s.proxy == nil {
		return nil
	}
	if err := s.proxy.stop(); err != nil {
		return fmt.Errorf("on %v: %w", s.proxy.stopSignal, err)
	}
	return nil
}

// rulesYAML is the benchmark's rule. With pins it leaves
// sessionPersistenceTimeoutInMinutes unset (180 minutes, the default users
// get); without, it sets it to 0. With v2 it sets proxyProtocol: V2 and
// points at the backends' header-parsing port; without, it leaves
// proxyProtocol unset (None) and points at the plain port.
func (r *runner) rulesYAML(port int, pins, v2 bool) string {
	extra := ""
	if !pins {
		extra += "  sessionPersistenceTimeoutInMinutes: 0\n"
	}
	backendPort := r.backendPort
	if v2 {
		extra += "  proxyProtocol: V2\n"
		backendPort = r.v2BackendPort
	}
	return fmt.Sprintf(`# Written by hack/bench: one rule, TCP and UDP, over the benchmark backends.
apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: bench
  namespace: default
spec:
  frontend:
    name: bench
    port: %d
  backendPool:
    addresses: [%s]
  backendPort: %d
  protocol: All
  sessionPersistence: ClientIP
  idleTimeoutInMinutes: 5
%s`, port, strings.Join(backendIPs, ", "), backendPort, extra)
}

// haproxyConfig is HAProxy's nearest equivalent of the rule: TCP only (the
// community edition cannot proxy UDP), source-IP hashing on a consistent
// hash ring, idle timeouts long enough for the idle test, defaults otherwise.
// With v2 its servers are the backends' header-parsing port, with
// send-proxy-v2.
func (r *runner) haproxyConfig(port int, v2 bool) string {
	backendPort, send := r.backendPort, ""
	if v2 {
		backendPort, send = r.v2BackendPort, " send-proxy-v2"
	}
	var servers strings.Builder
	for i, ip := range backendIPs {
		fmt.Fprintf(&servers, "    server b%d %s:%d%s\n", i+1, ip, backendPort, send)
	}
	maxconn := r.idleConns + 1000
	return fmt.Sprintf(`# Written by hack/bench.
global
    maxconn %d
    nbthread 2

defaults
    mode tcp
    maxconn %d
    timeout connect 5s
    timeout client 5m
    timeout server 5m

frontend bench
    bind 127.0.0.1:%d
    default_backend pool

backend pool
    balance source
    hash-type consistent
%s`, maxconn, maxconn, port, servers.String())
}

// nginxConfig is nginx's nearest equivalent of the rule's UDP side: the
// stream module, the client's address hashed on a consistent ring over the
// four backends, one session per client address and port that lasts until
// it has been idle for the rule's idle timeout (proxy_timeout 5m, and no
// proxy_responses: a session is not closed after so many replies). One
// worker per CPU (auto), each with its own socket (reuseport, as nginx
// recommends for UDP), so that a client's datagrams always reach the worker
// that holds its session; each socket with the 1 MiB receive buffer
// stickylb asks for its own. It also listens on TCP on the same port, over
// the same pool, only so that the driver can see it serve.
func (r *runner) nginxConfig(bin, prefix string, port int) (string, error) {
	module, err := nginxStreamModule(bin)
	if err != nil {
		return "", err
	}
	load := ""
	if module != "" {
		load = fmt.Sprintf("load_module %s;\n", module)
	}
	var servers strings.Builder
	for _, ip := range backendIPs {
		fmt.Fprintf(&servers, "        server %s:%d;\n", ip, r.backendPort)
	}
	return fmt.Sprintf(`# Written by hack/bench.
%sworker_processes auto;
worker_rlimit_nofile 65536;
pid %s;
error_log stderr warn;

events {
    worker_connections 16384;
}

stream {
    upstream pool {
        hash $remote_addr consistent;
%s    }
    server {
        listen 127.0.0.1:%d udp reuseport rcvbuf=1m;
        proxy_pass pool;
        proxy_timeout 5m;
    }
    server {
        listen 127.0.0.1:%d;
        proxy_pass pool;
    }
}
`, load, filepath.Join(prefix, "nginx.pid"), servers.String(), port, port), nil
}

// nginxStreamModule finds the stream module nginx must load: "" when it
// is built in, the module's path when it is a dynamic module (Debian's
// libnginx-mod-stream), an error when nginx has none.
func nginxStreamModule(bin string) (string, error) {
	out, err := exec.Command(bin, "-V").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s -V: %w", bin, err)
	}
	modules, dynamic := "", false
	for _, f := range strings.Fields(string(out)) {
		switch {
		case f == "--with-stream":
			return "", nil
		case f == "--with-stream=dynamic":
			dynamic = true
		case strings.HasPrefix(f, "--modules-path="):
			modules = strings.TrimPrefix(f, "--modules-path=")
		}
	}
	if !dynamic {
		return "", errors.New("nginx is built without the stream module")
	}
	if modules == "" {
		modules = "/usr/lib/nginx/modules"
	}
	path := filepath.Join(modules, "ngx_stream_module.so")
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("nginx's stream module is not installed (Debian: libnginx-mod-stream): %w", err)
	}
	return path, nil
}

// freePort returns the first port from first that is free for TCP and UDP on
// 127.0.0.1.
func freePort(first int) (int, error) {
	for port := first; port < first+100; port++ {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		pc, err := net.ListenPacket("udp", addr)
		ln.Close()
		if err != nil {
			continue
		}
		pc.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no free port in %d-%d on 127.0.0.1", first, first+99)
}

// waitAccepting waits until addr accepts a TCP connection, the process
// exits, or the timeout passes.
func waitAccepting(addr string, c *child, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if c.exited() {
			return fmt.Errorf("%s exited before serving %s: %v: %s", c.name, addr, c.waitErr, c.output())
		}
		conn, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not accept on %s within %s: %s", c.name, addr, timeout, c.output())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A child is a process the driver started. Every child dies with the driver
// (SIGKILL on parent death, and killChildren on interrupts).
type child struct {
	name       string
	cmd        *exec.Cmd
	stopSignal syscall.Signal
	group      bool // the child leads a process group of its own, killed as one
	out        *tail
	done       chan struct{}
	waitErr    error // valid once done is closed
}

var (
	childrenMu sync.Mutex
	children   = map[*child]bool{}
)

func newChild(name, bin string, args ...string) *child {
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out := &tail{max: 4 << 10}
	cmd.Stdout, cmd.Stderr = out, out
	return &child{name: name, cmd: cmd, stopSignal: syscall.SIGTERM, out: out, done: make(chan struct{})}
}

func (c *child) start() error {
	childrenMu.Lock()
	defer childrenMu.Unlock()
	if err := c.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", c.name, err)
	}
	children[c] = true
	go func() {
		c.waitErr = c.cmd.Wait()
		childrenMu.Lock()
		delete(children, c)
		childrenMu.Unlock()
		close(c.done)
	}()
	return nil
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends the stop signal and waits; after stopTimeout it kills. It
// returns the exit error (nil for exit status 0).
func (c *child) stop() error {
	if !c.exited() {
		_ = c.cmd.Process.Signal(c.stopSignal)
		select {
		case <-c.done:
		case <-time.After(stopTimeout):
			c.kill()
			<-c.done
			return fmt.Errorf("%s still running %s after %v: killed", c.name, stopTimeout, c.stopSignal)
		}
	}
	if c.waitErr != nil {
		return fmt.Errorf("%s: %w: %s", c.name, c.waitErr, c.output())
	}
	return nil
}

func (c *child) output() string {
	s := strings.TrimSpace(c.out.String())
	if s == "" {
		return "(no output)"
	}
	return strings.ReplaceAll(s, "\n", " | ")
}

func killChildren() {
	childrenMu.Lock()
	defer childrenMu.Unlock()
	for c := range children {
		c.kill()
	}
}

// kill ends the child at once, with its process group if it leads one.
func (c *child) kill() {
	if c.group {
		_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		return
	}
	_ = c.cmd.Process.Kill()
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// procStats reads a process's resident memory and open file descriptors.
func procStats(pid int) (rssKiB int64, fds int, err error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	rssKiB = -1
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rssKiB, err = strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, 0, fmt.Errorf("parse VmRSS of %d: %w", pid, err)
			}
		}
	}
	if rssKiB < 0 {
		return 0, 0, errors.New("no VmRSS in /proc/" + strconv.Itoa(pid) + "/status")
	}
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, 0, err
	}
	return rssKiB, len(entries), nil
}
