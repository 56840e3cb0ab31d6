package main

import (
	"bytes"
	"encoding/base64"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/testbackend"
	"github.com/stickylb/stickylb/internal/testenv"
)

// startPeeredProxy runs `stickylb proxy` on bind, sharing pins with peers,
// and waits until port accepts.
func startPeeredProxy(t *testing.T, rules, bind string, port uint16, extra ...string) *proxyProcess {
	t.Helper()
	metrics := testenv.FreeAddr(t)
	logs := &testenv.Output{}
	args := append([]string{"proxy", "--rules", rules, "--bind-address", bind, "--metrics-bind-address", metrics}, extra...)
	cmd := exec.Command(stickylbBinary(t), args...)
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
	testbackend.Eventually(t, 15*time.Second, "proxy on "+front.String()+" accepts", func() bool {
		c, err := testbackend.Dial(testbackend.ClientIP(0), front)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

// TestProxiesSharePins: two standalone proxies with one key. Clients pinned
// through A keep their backend through B after a fifth backend joins the
// pool, although B never saw them; B's own pick would move a fifth of them.
func TestProxiesSharePins(t *testing.T) {
	backends := testbackend.StartN(t, 5, 9311)
	port := freePort(t)
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	writeFile(t, rules, rulesYAML(backends[:4], port))
	keyFile := filepath.Join(t.TempDir(), "peer-key")
	if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{9}, 32))+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	peerPort := testbackend.FreePort(t, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2"))
	list := "--peers=127.0.0.1:" + itoa(peerPort) + ",127.0.0.2:" + itoa(peerPort)
	bindA, bindB := "--peer-bind-address=127.0.0.1:"+itoa(peerPort), "--peer-bind-address=127.0.0.2:"+itoa(peerPort)
	a := startPeeredProxy(t, rules, "127.0.0.1", port, "--peer-key-file="+keyFile, list, bindA)
	b := startPeeredProxy(t, rules, "127.0.0.2", port, "--peer-key-file="+keyFile, list, bindB)
	testbackend.Eventually(t, 10*time.Second, "the proxies peer", func() bool {
		return a.metric(t, "stickylb_peers") == "1" && b.metric(t, "stickylb_peers") == "1"
	})

	frontA := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	frontB := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port)
	const clients = 1000
	before := testbackend.Pins(t, clients, frontA)

	writeFile(t, rules, rulesYAML(backends, port))
	for _, p := range []*proxyProcess{a, b} {
		testbackend.Eventually(t, 10*time.Second, "both proxies serve five backends", func() bool {
			return strings.Count(p.logs.String(), `"rules loaded"`) >= 2
		})
	}
	testbackend.Eventually(t, 5*time.Second, "B learned A's overriding pins", func() bool {
		return b.metric(t, `stickylb_peer_pins_received_total{via="gossip"}`) != "0" ||
			b.metric(t, `stickylb_peer_pins_received_total{via="push_pull"}`) != "0"
	})
	time.Sleep(500 * time.Millisecond) // the rest of a burst
	after := testbackend.Pins(t, clients, frontB)
	moved := 0
	for i := range before {
		if before[i] != after[i] {
			moved++
		}
	}
	if moved > clients/100 {
		t.Errorf("%d of %d clients pinned through A went elsewhere through B after a backend joined; want at most 1%%", moved, clients)
	}
	t.Logf("%d of %d clients moved", moved, clients)
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }
