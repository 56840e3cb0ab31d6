package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// serveV2 runs the header-parsing echo backend on a port of 127.0.0.1 and
// returns its address.
func serveV2(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go acceptLoop(v2Listener(ln))
	return ln.Addr().String()
}

// echoAfter connects to addr, sends prefix then an echo request, and returns
// what comes back until the backend closes or 4 bytes arrived.
func echoAfter(t *testing.T, addr string, prefix []byte) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	// One write, as stickylb and HAProxy send the header with the client's
	// first bytes when they have them.
	if _, err := c.Write(append(prefix, pingRequest...)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	n, _ := io.ReadFull(c, buf)
	return string(buf[:n])
}

func TestV2BackendConsumesTheHeader(t *testing.T) {
	addr := serveV2(t)
	client, frontend := netip.MustParseAddrPort("127.16.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:18080")
	for _, tc := range []struct {
		name   string
		header *proxyproto.Header
	}{
		{"PROXY", proxyproto.HeaderProxyFromAddrs(2, net.TCPAddrFromAddrPort(client), net.TCPAddrFromAddrPort(frontend))},
		{"LOCAL (a probe)", &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var hdr bytes.Buffer
			if _, err := tc.header.WriteTo(&hdr); err != nil {
				t.Fatal(err)
			}
			if got := echoAfter(t, addr, hdr.Bytes()); got != string(ping) {
				t.Errorf("echo after a v2 %s header = %q, want %q", tc.name, got, ping)
			}
		})
	}
}

// A target that forgets the header, or sends v1, gets its connections
// refused, and the short-connections test counts them as failed.
func TestV2BackendRequiresTheHeader(t *testing.T) {
	addr := serveV2(t)
	ctx := context.Background()
	err := shortConnection(ctx, netip.MustParseAddr("127.0.0.1"), addr)
	if err == nil || !strings.Contains(err.Error(), "the backend refused the connection") {
		t.Errorf("no header: shortConnection = %v, want a refused connection", err)
	}

	v1 := proxyproto.HeaderProxyFromAddrs(1, &net.TCPAddr{IP: net.IPv4(127, 16, 0, 1), Port: 40000}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 18080})
	var hdr bytes.Buffer
	if _, err := v1.WriteTo(&hdr); err != nil {
		t.Fatal(err)
	}
	if got := echoAfter(t, addr, hdr.Bytes()); got == string(ping) || got == "" || got[0] != refusedMark {
		t.Errorf("echo after a v1 header = %q, want a refusal", got)
	}
}

func TestParseReady(t *testing.T) {
	if p, v2, err := parseReady("ready 19000 19001"); err != nil || p != 19000 || v2 != 19001 {
		t.Errorf("parseReady = %d, %d, %v", p, v2, err)
	}
	for _, bad := range []string{"ready 19000", "ready x 19001", "19000 19001", ""} {
		if _, _, err := parseReady(bad); err == nil {
			t.Errorf("parseReady(%q) accepted", bad)
		}
	}
}

// The v2 targets' configurations point at the header-parsing port and ask
// for the header; the others do neither.
func TestV2Configs(t *testing.T) {
	r := &runner{backendPort: 19000, v2BackendPort: 19001}
	for _, tc := range []struct {
		name, cfg string
		want      []string
		not       []string
	}{
		{"stickylb", r.rulesYAML(18080, true, false), []string{"backendPort: 19000\n"}, []string{"proxyProtocol", "sessionPersistenceTimeoutInMinutes"}},
		{"stickylb-nopins", r.rulesYAML(18080, false, false), []string{"backendPort: 19000\n", "sessionPersistenceTimeoutInMinutes: 0\n"}, []string{"proxyProtocol"}},
		{"stickylb-v2", r.rulesYAML(18080, true, true), []string{"backendPort: 19001\n", "  proxyProtocol: V2\n"}, []string{"sessionPersistenceTimeoutInMinutes"}},
		{"haproxy", r.haproxyConfig(18090, false), []string{"server b1 127.0.1.1:19000\n"}, []string{"send-proxy", ":19001"}},
		{"haproxy-v2", r.haproxyConfig(18090, true), []string{"server b1 127.0.1.1:19001 send-proxy-v2\n", "server b4 127.0.1.4:19001 send-proxy-v2\n"}, []string{":19000"}},
	} {
		for _, w := range tc.want {
			if !strings.Contains(tc.cfg, w) {
				t.Errorf("%s: no %q in\n%s", tc.name, w, tc.cfg)
			}
		}
		for _, n := range tc.not {
			if strings.Contains(tc.cfg, n) {
				t.Errorf("%s: %q in\n%s", tc.name, n, tc.cfg)
			}
		}
	}
}
