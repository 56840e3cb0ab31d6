package proxy

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stickylb/stickylb/dataplane/snapshot"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// Tests use real sockets on loopback: backends on 127.0.1.x, the proxy on
// 127.0.0.1 and clients bound to 127.0.2.0 and beyond.

var clientIP = testbackend.ClientIP

func freePort(t *testing.T) uint16 { return testbackend.FreePort(t) }

type backendServer = testbackend.Server

func startBackends(t *testing.T, n int, port uint16) []*backendServer {
	return testbackend.StartN(t, n, port)
}

func frontend(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
}

type ruleOpt func(*snapshot.Rule)

func rule(name string, port uint16, backends []*backendServer, opts ...ruleOpt) snapshot.Rule {
	r := snapshot.Rule{
		Name: "default/" + name, Frontend: "default/default", Bind: netip.MustParseAddr("127.0.0.1"), Port: port,
		Protocols: []snapshot.Protocol{snapshot.TCP}, Persistence: snapshot.PersistenceClientIP,
		IdleTimeout: 4 * time.Minute,
	}
	for _, b := range backends {
		r.Backends = append(r.Backends, snapshot.Backend{Addr: b.Addr})
	}
	for _, o := range opts {
		o(&r)
	}
	return r
}

func protocols(p ...snapshot.Protocol) ruleOpt {
	return func(r *snapshot.Rule) { r.Protocols = p }
}

func persistence(p snapshot.Persistence) ruleOpt {
	return func(r *snapshot.Rule) { r.Persistence = p }
}

type testProxy struct {
	*Proxy
	reg     *prometheus.Registry
	version uint64
}

func newProxy(t *testing.T, opts Options) *testProxy {
	t.Helper()
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return &testProxy{Proxy: p, reg: reg}
}

// apply serves the rules as the next snapshot version.
func (p *testProxy) apply(t *testing.T, rules ...snapshot.Rule) {
	t.Helper()
	p.version++
	s := &snapshot.Snapshot{Version: p.version, Rules: rules}
	s.Normalize()
	failed, err := p.Apply(s)
	if err != nil {
		t.Fatal(err)
	}
	for name, err := range failed {
		t.Fatalf("rule %s: %v", name, err)
	}
}

// counter reads a metric series' value.
func (p *testProxy) counter(c prometheus.Collector) float64 { return testutil.ToFloat64(c) }

func dialFrom(src netip.Addr, port uint16) (*net.TCPConn, error) {
	return testbackend.Dial(src, frontend(port))
}

func backendOf(src netip.Addr, port uint16) (string, *net.TCPConn, error) {
	return testbackend.BackendOf(src, frontend(port))
}

func mustBackendOf(t *testing.T, src netip.Addr, port uint16) string {
	t.Helper()
	return testbackend.MustBackendOf(t, src, frontend(port))
}

func udpExchange(t *testing.T, conn *net.UDPConn) (string, error) {
	return testbackend.UDPExchange(conn)
}

func udpClient(t *testing.T, src netip.Addr, port uint16) *net.UDPConn {
	t.Helper()
	return testbackend.UDPClient(t, src, frontend(port))
}

var eventually = testbackend.Eventually
