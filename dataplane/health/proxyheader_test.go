package health

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/stickylb/stickylb/dataplane/proxyheader"
)

// headerBackend accepts TCP connections that must open with a PROXY
// protocol header (parsed by a PROXY protocol library), serves HTTP or HTTPS
// on them, and records the header of each.
type headerBackend struct {
	mu      sync.Mutex
	headers []*proxyproto.Header
	refused int // connections without a valid header
}

func (b *headerBackend) record(h *proxyproto.Header, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil || h == nil {
		b.refused++
		return
	}
	b.headers = append(b.headers, h)
}

func (b *headerBackend) seen() (headers []*proxyproto.Header, refused int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*proxyproto.Header(nil), b.headers...), b.refused
}

// serveRequiringHeader serves HTTP (or HTTPS) on ip behind a listener that
// refuses connections without a PROXY header.
func serveRequiringHeader(t *testing.T, ip string, useTLS bool) (netip.AddrPort, *headerBackend) {
	t.Helper()
	raw, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	b := &headerBackend{}
	ln := &recordingListener{Listener: &proxyproto.Listener{Listener: raw, ReadHeaderTimeout: 2 * time.Second}, b: b}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	srv.Listener.Close()
	srv.Listener = ln
	if useTLS {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return addrPortOf(t, raw), b
}

// recordingListener reads each connection's header as it is accepted, so
// that a plain TCP probe (which sends nothing after it) is recorded too.
type recordingListener struct {
	net.Listener
	b *headerBackend
}

func (l *recordingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		pc := c.(*proxyproto.Conn)
		_ = pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		h, err := pc.ProxyHeader(), headerErr(pc)
		l.b.record(h, err)
		if err != nil {
			pc.Close()
			continue
		}
		_ = pc.SetReadDeadline(time.Time{})
		return pc, nil
	}
}

// headerErr makes the connection read its header, and says whether it had one.
func headerErr(c *proxyproto.Conn) error {
	// Reading zero bytes would not trigger the header read; peek through
	// the library's header accessor after a Read of the header only.
	if c.ProxyHeader() != nil {
		return nil
	}
	var one [0]byte
	if _, err := c.Read(one[:]); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if c.ProxyHeader() == nil {
		return errors.New("no PROXY header")
	}
	return nil
}

func TestProbesSendTheProxyHeader(t *testing.T) {
	for i, tc := range []struct {
		protocol Protocol
		version  proxyheader.Version
	}{
		{TCP, proxyheader.V1}, {TCP, proxyheader.V2},
		{HTTP, proxyheader.V1}, {HTTP, proxyheader.V2},
		{HTTPS, proxyheader.V1}, {HTTPS, proxyheader.V2},
	} {
		t.Run(string(tc.protocol)+"/v"+string(rune('0'+tc.version)), func(t *testing.T) {
			ip := netip.AddrFrom4([4]byte{127, 0, 1, byte(31 + i)}).String()
			ap, b := serveRequiringHeader(t, ip, tc.protocol == HTTPS)
			spec := Spec{Protocol: tc.protocol, Port: int(ap.Port()), Interval: time.Second, Threshold: 1}
			if tc.protocol != TCP {
				spec.RequestPath = "/healthz"
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			// Without the header the backend refuses the probe...
			if tc.protocol != TCP {
				if ok, reason := newChecker(spec, newHTTPClient(0)).check(ctx, ap); ok {
					t.Fatalf("a probe without the header passed: %s", reason)
				}
			}
			// ...with it, the probe passes, and the backend saw LOCAL / UNKNOWN.
			spec.ProxyHeader = tc.version
			if ok, reason := newChecker(spec, newHTTPClient(tc.version)).check(ctx, ap); !ok {
				t.Fatalf("probe failed: %s", reason)
			}
			waitFor(t, 2*time.Second, func() bool { h, _ := b.seen(); return len(h) > 0 }, "the backend reads the header")
			headers, _ := b.seen()
			h := headers[len(headers)-1]
			if h.Version != byte(tc.version) {
				t.Errorf("header version %d, want %d", h.Version, tc.version)
			}
			if tc.version == proxyheader.V2 && h.Command != proxyproto.LOCAL {
				t.Errorf("v2 probe header command %v, want LOCAL", h.Command)
			}
			if tc.version == proxyheader.V1 && h.TransportProtocol != proxyproto.UNSPEC {
				t.Errorf("v1 probe header %v, want PROXY UNKNOWN", h.TransportProtocol)
			}
		})
	}
}
