package main

import (
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// stickylbBinary builds the real binary once per test run.
func stickylbBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "stickylb-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "stickylb")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// rulesYAML is a rules file with one ClientIP rule per port over backends.
func rulesYAML(backends []*testbackend.Server, ports ...uint16) string {
	var b strings.Builder
	for i, port := range ports {
		fmt.Fprintf(&b, `---
apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: web-%d
spec:
  frontend:
    port: %d
  backendPool:
    addresses:
`, i, port)
		for _, s := range backends {
			fmt.Fprintf(&b, "    - %s\n", s.Addr.Addr())
		}
		fmt.Fprintf(&b, "  backendPort: %d\n  protocol: All\n  sessionPersistence: ClientIP\n", backends[0].Addr.Port())
	}
	return b.String()
}

type proxyProcess struct {
	cmd     *exec.Cmd
	metrics string
	logs    *testenv.Output
}

// startProxy runs `stickylb proxy` on bind with the rules file and waits
// until port accepts.
func startProxy(t *testing.T, rules, bind string, port uint16) *proxyProcess {
	t.Helper()
	metrics := testenv.FreeAddr(t)
	logs := &testenv.Output{}
	cmd := exec.Command(stickylbBinary(t), "proxy", "--rules", rules, "--bind-address", bind, "--metrics-bind-address", metrics)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proxyProcess{cmd: cmd, metrics: metrics, logs: logs}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("stickylb proxy on %s logged:\n%s", bind, logs.String())
		}
	})
	front := netip.AddrPortFrom(netip.MustParseAddr(bind), port)
	testbackend.Eventually(t, 10*time.Second, "proxy on "+front.String()+" accepts", func() bool {
		c, err := testbackend.Dial(testbackend.ClientIP(0), front)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

func (p *proxyProcess) metric(t *testing.T, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			return line[strings.LastIndex(line, " ")+1:]
		}
	}
	return ""
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	// Write then rename, as editors and ConfigMap updates do.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestTwoProxiesAgreeOnEveryClient(t *testing.T) {
	backends := testbackend.StartN(t, 4, 9301)
	port := freePort(t)
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	writeFile(t, rules, rulesYAML(backends, port))
	startProxy(t, rules, "127.0.0.1", port)
	startProxy(t, rules, "127.0.0.2", port)
	a := testbackend.Pins(t, 500, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port))
	b := testbackend.Pins(t, 500, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port))
	spread := map[string]int{}
	for i := range a {
		if a[i] != b[i] {
			t.Errorf("%s: proxy A chose %s, proxy B %s", testbackend.ClientIP(i), a[i], b[i])
		}
		spread[a[i]]++
	}
	if len(spread) != 4 {
		t.Errorf("clients reached %v, want all 4 backends", spread)
	}
}

func TestProxyReloads(t *testing.T) {
	backends := testbackend.StartN(t, 2, 9302)
	port, port2 := freePort(t), freePort(t)
	dir := t.TempDir()
	rules := filepath.Join(dir, "rules.yaml")
	writeFile(t, rules, rulesYAML(backends, port))
	p := startProxy(t, rules, "127.0.0.1", port)
	front := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	// Listeners open before Apply publishes the version: wait for it.
	testbackend.Eventually(t, 5*time.Second, "snapshot version 1", func() bool {
		return p.metric(t, "stickylb_snapshot_version") == "1"
	})

	// A bad file is refused with the field named; the old rules keep serving.
	bad := strings.Replace(rulesYAML(backends, port), fmt.Sprintf("port: %d", port), "port: 0", 1)
	writeFile(t, rules, bad)
	testbackend.Eventually(t, 5*time.Second, "bad file refused", func() bool {
		return p.metric(t, "stickylb_rules_file_last_load_success") == "0"
	})
	if !strings.Contains(p.logs.String(), "spec.frontend.port") {
		t.Errorf("the refusal does not name spec.frontend.port:\n%s", p.logs.String())
	}
	testbackend.MustBackendOf(t, testbackend.ClientIP(1), front)

	// A good file with a second rule is picked up on change.
	writeFile(t, rules, rulesYAML(backends, port, port2))
	testbackend.Eventually(t, 5*time.Second, "second rule served", func() bool {
		c, err := testbackend.Dial(testbackend.ClientIP(1), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port2))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	testbackend.Eventually(t, 5*time.Second, "snapshot version 2 after reload", func() bool {
		return p.metric(t, "stickylb_snapshot_version") == "2"
	})

	// SIGHUP reloads too (here: drop the second rule).
	if err := os.WriteFile(rules, []byte(rulesYAML(backends, port)), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Process.Signal(syscall.SIGHUP)
	testbackend.Eventually(t, 5*time.Second, "second rule gone", func() bool {
		c, err := testbackend.Dial(testbackend.ClientIP(1), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port2))
		if err == nil {
			c.Close()
		}
		return err != nil
	})

	// SIGTERM: exit 0 once the drain is done.
	_, held, err := testbackend.BackendOf(testbackend.ClientIP(2), front)
	if err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	time.Sleep(200 * time.Millisecond)
	held.Close()
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("proxy did not exit after SIGTERM and the last connection closing")
	}
}

func TestProxyRefusesBadFileAtStart(t *testing.T) {
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	writeFile(t, rules, "apiVersion: lb.stickylb.io/v1alpha1\nkind: LoadBalancerRule\nmetadata:\n  name: x\nspec:\n  frontend:\n    port: 80\n  backendPool:\n    addresses: [10.0.0.1, 10.0.0.1]\n  backendPort: 80\n")
	out, err := exec.Command(stickylbBinary(t), "proxy", "--rules", rules, "--metrics-bind-address", "0").CombinedOutput()
	if err == nil {
		t.Fatal("started with a bad rules file")
	}
	if !strings.Contains(string(out), "spec.backendPool.addresses[1]") || !strings.Contains(string(out), "Duplicate value") {
		t.Errorf("error does not name the field:\n%s", out)
	}
}

func TestProxyHelpDocumentsEveryFlag(t *testing.T) {
	out, err := exec.Command(stickylbBinary(t), "proxy", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("--help: %v\n%s", err, out)
	}
	n := 0
	proxyFlags(&proxyOptions{}).VisitAll(func(f *flag.Flag) {
		n++
		if !regexp.MustCompile(`(?m)^\s+-`+f.Name+`\b`).Match(out) || len(f.Usage) < 20 {
			t.Errorf("--help does not document -%s", f.Name)
		}
	})
	if n < 9 {
		t.Errorf("only %d flags", n)
	}
}

// freePort is free on both proxies' bind addresses.
func freePort(t *testing.T) uint16 {
	return testbackend.FreePort(t, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"))
}

// TestProxyCongestionControlWithoutPrivilege runs the proxy as an
// unprivileged user, as the Helm chart does: the default backend list takes
// cubic where the kernel allows it to anyone and Reno where it does not, and
// the client side keeps the system's algorithm.
func TestProxyCongestionControlWithoutPrivilege(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start a process as another user")
	}
	allowed, err := os.ReadFile("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
	if err != nil {
		t.Fatal(err)
	}
	system, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Fatal(err)
	}
	wantBackend := "reno"
	if slices.Contains(strings.Fields(string(allowed)), "cubic") {
		wantBackend = "cubic"
	}
	bin := stickylbBinary(t)
	if err := os.Chmod(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "stickylb-cc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	backends := testbackend.StartN(t, 1, testbackend.FreePort(t))
	port := testbackend.FreePort(t)
	rules := filepath.Join(dir, "rules.yaml")
	writeFile(t, rules, rulesYAML(backends, port))
	metrics := testenv.FreeAddr(t)
	logs := &testenv.Output{}
	cmd := exec.Command(bin, "proxy", "--rules", rules, "--metrics-bind-address", metrics)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("stickylb proxy logged:\n%s", logs.String())
		}
	})
	want := []string{
		fmt.Sprintf(`stickylb_tcp_congestion_control_info{algorithm=%q,side="backend"} 1`, wantBackend),
		fmt.Sprintf(`stickylb_tcp_congestion_control_info{algorithm=%q,side="frontend"} 1`, strings.TrimSpace(string(system))),
	}
	if wantBackend != strings.TrimSpace(string(system)) {
		// Clients under --near-client-rtt run the backend side's algorithm.
		want = append(want, fmt.Sprintf(`stickylb_tcp_congestion_control_info{algorithm=%q,side="frontend_near"} 1`, wantBackend))
	}
	var body []byte
	testbackend.Eventually(t, 10*time.Second, "the metrics report both sides' algorithms", func() bool {
		resp, err := http.Get("http://" + metrics + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ = io.ReadAll(resp.Body)
		for _, w := range want {
			if !strings.Contains(string(body), w) {
				return false
			}
		}
		return true
	})
}

func TestNearClientRTTFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want time.Duration
		err  string
	}{
		{nil, 0, ""}, // the dataplane's default, 1ms
		{[]string{"--near-client-rtt=5ms"}, 5 * time.Millisecond, ""},
		{[]string{"--near-client-rtt=0"}, -1, ""}, // off
		{[]string{"--near-client-rtt=-1ms"}, 0, `invalid value "-1ms" for flag -near-client-rtt: must not be negative`},
		{[]string{"--near-client-rtt=soon"}, 0, `invalid value "soon" for flag -near-client-rtt`},
	} {
		var o proxyOptions
		fs := proxyFlags(&o)
		fs.SetOutput(io.Discard)
		err := fs.Parse(tc.args)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v: error %v, want %q", tc.args, err, tc.err)
			}
		case err != nil:
			t.Errorf("%v: %v", tc.args, err)
		case o.limits.NearClientRTT != tc.want:
			t.Errorf("%v: NearClientRTT %v, want %v", tc.args, o.limits.NearClientRTT, tc.want)
		}
	}
}

func TestProxyRefusesCongestionControlTheKernelRefuses(t *testing.T) {
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	writeFile(t, rules, rulesYAML([]*testbackend.Server{{Addr: netip.MustParseAddrPort("127.0.1.1:9000")}}, testbackend.FreePort(t)))
	out, err := exec.Command(stickylbBinary(t), "proxy", "--rules", rules, "--metrics-bind-address", "0",
		"--backend-congestion-control", "no-such-algorithm").CombinedOutput()
	if err == nil {
		t.Fatal("started with an algorithm the kernel does not have")
	}
	for _, want := range []string{"--backend-congestion-control", "no-such-algorithm: not in net.ipv4.tcp_available_congestion_control"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error does not say %q:\n%s", want, out)
		}
	}
}
