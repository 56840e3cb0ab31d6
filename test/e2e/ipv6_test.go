package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

// addLocalIPv6 makes addr an address of the suite's namespace loopback.
func addLocalIPv6(t *testing.T, addr string) netip.Addr {
	t.Helper()
	out, err := exec.Command("ip", "-6", "addr", "add", addr+"/128", "dev", "lo", "nodad").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "File exists") && !strings.Contains(string(out), "already assigned") {
		t.Fatalf("ip -6 addr add %s: %v: %s", addr, err, out)
	}
	return netip.MustParseAddr(addr)
}

// TestStandaloneProxyOverIPv6 runs `stickylb proxy` on an IPv6 frontend with
// IPv6 backends, in the suite's private network namespace: a client is
// pinned to one backend over TCP and gets the same one over UDP.
func TestStandaloneProxyOverIPv6(t *testing.T) {
	const port, backendPort = 9600, 9601
	var backends []*testbackend.Server
	var pool strings.Builder
	for i := range 3 {
		ip := addLocalIPv6(t, fmt.Sprintf("fd00:1::%d", i+1))
		backends = append(backends, testbackend.Start(t, ip.String(), backendPort))
		fmt.Fprintf(&pool, "    - %s\n", ip)
	}
	front := addLocalIPv6(t, "fd00:3::1")
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	yaml := fmt.Sprintf(`apiVersion: lb.stickylb.io/v1alpha1
kind: LoadBalancerRule
metadata:
  name: web6
spec:
  frontend:
    port: %d
  backendPool:
    addresses:
%s  backendPort: %d
  protocol: All
  sessionPersistence: ClientIP
`, port, pool.String(), backendPort)
	if err := os.WriteFile(rules, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.Output{}
	cmd := exec.Command(stickylb, "proxy", "--rules", rules, "--bind-address", front.String(), "--metrics-bind-address", "0")
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
	frontend := netip.AddrPortFrom(front, port)
	clients := make([]netip.Addr, 24)
	for i := range clients {
		clients[i] = addLocalIPv6(t, fmt.Sprintf("fd00:2::%d", i+1))
	}
	testbackend.Eventually(t, 10*time.Second, "proxy on "+frontend.String()+" accepts", func() bool {
		c, err := testbackend.Dial(clients[0], frontend)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	// The UDP listener opens right after the TCP one.
	testbackend.Eventually(t, 10*time.Second, "proxy on udp "+frontend.String()+" answers", func() bool {
		_, err := testbackend.UDPExchange(testbackend.UDPClient(t, clients[len(clients)-1], frontend))
		return err == nil
	})

	seen := map[string]int{}
	for _, src := range clients {
		tcp := testbackend.MustBackendOf(t, src, frontend)
		if again := testbackend.MustBackendOf(t, src, frontend); again != tcp {
			t.Fatalf("client %s: TCP went to %s, then %s", src, tcp, again)
		}
		udp, err := testbackend.UDPExchange(testbackend.UDPClient(t, src, frontend))
		if err != nil {
			t.Fatalf("client %s: UDP: %v", src, err)
		}
		if udp != tcp {
			t.Fatalf("client %s: TCP to %s but UDP to %s under ClientIP", src, tcp, udp)
		}
		seen[tcp]++
	}
	if len(seen) < 2 {
		t.Fatalf("24 clients all went to %v", seen)
	}
}
