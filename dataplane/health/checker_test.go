package health

import (
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"
)

const probePath = "/probe/ready?deep=1"

// backend answers the configured probe path with status, and 200 on any
// other path, so a probe that follows a redirect or asks the wrong path
// would wrongly pass.
type backend struct {
	status int

	mu   sync.Mutex
	seen []*http.Request
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	b.seen = append(b.seen, r.Clone(r.Context()))
	b.mu.Unlock()
	if r.URL.RequestURI() != probePath {
		w.WriteHeader(http.StatusOK)
		return
	}
	if b.status == http.StatusMovedPermanently {
		w.Header().Set("Location", "/moved")
	}
	w.WriteHeader(b.status)
	io.WriteString(w, "status page\n")
}

func (b *backend) requests() []*http.Request {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*http.Request(nil), b.seen...)
}

func okHandler() http.Handler { return &backend{status: http.StatusOK} }

func httpTarget(ap netip.AddrPort, p Protocol, interval time.Duration) Target {
	return Target{Addr: ap.Addr(), Spec: Spec{
		Protocol: p, Port: int(ap.Port()), RequestPath: probePath, Interval: interval, Threshold: 1,
	}}
}

func TestHTTPProbePassesOnlyOn200(t *testing.T) {
	const interval = 50 * time.Millisecond
	cases := []struct {
		name     string
		protocol Protocol
		status   int
		wantUp   bool
	}{
		{"HTTP 200 passes", HTTP, http.StatusOK, true},
		{"HTTP 503 fails", HTTP, http.StatusServiceUnavailable, false},
		{"HTTP 404 fails", HTTP, http.StatusNotFound, false},
		{"HTTP 301 fails and is not followed", HTTP, http.StatusMovedPermanently, false},
		{"HTTP 204 fails", HTTP, http.StatusNoContent, false},
		{"HTTPS 200 passes with a self-signed certificate", HTTPS, http.StatusOK, true},
		{"HTTPS 500 fails", HTTPS, http.StatusInternalServerError, false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := &backend{status: tc.status}
			ip := netip.AddrFrom4([4]byte{127, 0, 1, byte(11 + i)}).String()
			ap, conns := serveHTTP(t, ip, tc.protocol == HTTPS, b)
			target := httpTarget(ap, tc.protocol, interval)
			m, rec := newMonitor(t)
			if err := m.Update([]Target{target}); err != nil {
				t.Fatal(err)
			}

			wantReason := "HTTP " + strconv.Itoa(tc.status)
			if tc.wantUp {
				st := waitProbes(t, m, target, 4, 3*time.Second)
				if !st.Up || st.Failures != 0 || rec.count() != 0 {
					t.Fatalf("status %+v, %d notifications; want up, no failures, none", st, rec.count())
				}
				if st.LastReason != wantReason {
					t.Errorf("last reason = %q, want %q", st.LastReason, wantReason)
				}
			} else {
				down, _ := rec.wait(t, 1, interval+time.Second)
				if down.Up || down.Reason != wantReason {
					t.Fatalf("transition = %+v, want down with reason %q", down, wantReason)
				}
			}

			reqs := b.requests()
			if len(reqs) == 0 {
				t.Fatal("backend saw no requests")
			}
			// A connection is counted when accepted, before its request is
			// handled: one fresh connection per probe gives at least as many
			// connections as requests, reuse gives fewer.
			if n := conns(); n < len(reqs) {
				t.Errorf("%d requests over %d connections: probes reuse connections", len(reqs), n)
			}
			for _, r := range reqs {
				if r.Method != http.MethodGet || r.URL.RequestURI() != probePath {
					t.Errorf("request %s %s, want GET %s (redirects must not be followed)", r.Method, r.URL.RequestURI(), probePath)
				}
				if r.Host != ap.String() {
					t.Errorf("Host = %q, want %q", r.Host, ap)
				}
				if ua := r.Header.Get("User-Agent"); ua != "stickylb-probe" {
					t.Errorf("User-Agent = %q, want stickylb-probe", ua)
				}
				if (r.TLS != nil) != (tc.protocol == HTTPS) {
					t.Errorf("request over TLS = %v, want %v", r.TLS != nil, tc.protocol == HTTPS)
				}
			}
		})
	}
}

func TestHTTPProbeTimesOut(t *testing.T) {
	const interval = 100 * time.Millisecond
	release := make(chan struct{})
	hang := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	ap, _ := serveHTTP(t, "127.0.1.30", false, hang)
	t.Cleanup(func() { close(release) }) // runs before the server's Close
	target := httpTarget(ap, HTTP, interval)
	m, rec := newMonitor(t)
	if err := m.Update([]Target{target}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	down, _ := rec.wait(t, 1, interval*2+time.Second)
	if want := "timeout after 100ms"; down.Up || down.Reason != want {
		t.Fatalf("transition = %+v, want down with reason %q", down, want)
	}
	t.Logf("down after %v", time.Since(start))
}

func TestProbeOfClosedPortSaysConnectionRefused(t *testing.T) {
	ap := closedPort(t, "127.0.1.31")
	target := httpTarget(ap, HTTP, 50*time.Millisecond)
	m, rec := newMonitor(t)
	if err := m.Update([]Target{target}); err != nil {
		t.Fatal(err)
	}
	down, _ := rec.wait(t, 1, time.Second)
	if want := "connect: connection refused"; down.Reason != want {
		t.Errorf("reason = %q, want %q", down.Reason, want)
	}
}
