package proxy

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// systemCongestionControl is what a new TCP socket of this process runs.
func systemCongestionControl(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	name, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		t.Fatal(err)
	}
	return name
}

// otherCongestionControl finds an algorithm this process may set that is
// not the system's, so that a socket running it was set by the proxy.
func otherCongestionControl(t *testing.T, system string) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	for _, name := range []string{"reno", "cubic", "bbr"} {
		if name != system && unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, name) == nil {
			return name
		}
	}
	t.Skipf("the kernel lets this process set no algorithm but %s", system)
	return ""
}

// proxiedCongestion opens one proxied connection, has the echoing backend
// send echo bytes back through it, and reports the congestion control of the
// proxy's client socket and backend socket.
func proxiedCongestion(t *testing.T, opts Options, echo int) (frontend, backend string, p *testProxy) {
	t.Helper()
	backends := startBackends(t, 1, 9026)
	port := freePort(t)
	p = newProxy(t, opts)
	p.apply(t, rule("cc", port, backends))
	c, err := dialFrom(clientIP(90), port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	sent := bytes.Repeat([]byte("0123456789abcdef"), echo/16)
	go c.Write(sent)
	got := make([]byte, len(sent))
	if _, err := io.ReadFull(r, got); err != nil || !bytes.Equal(got, sent) {
		t.Fatalf("echo of %d bytes: %v", len(sent), err)
	}
	eventually(t, 5*time.Second, "one flow", func() bool { return p.tcpConns.Load() == 1 })
	flows := 0
	onLoops(p, func(_ int, l *loop) {
		l.flows.each(func(f *tcpFlow) {
			flows++
			var err error
			if frontend, err = unix.GetsockoptString(f.cfd, unix.IPPROTO_TCP, unix.TCP_CONGESTION); err != nil {
				t.Error(err)
			}
			if backend, err = unix.GetsockoptString(f.bfd, unix.IPPROTO_TCP, unix.TCP_CONGESTION); err != nil {
				t.Error(err)
			}
		})
	})
	if flows != 1 {
		t.Fatalf("%d flows, want 1", flows)
	}
	return frontend, backend, p
}

// TestCongestionControlOfEachSide checks that the algorithm asked of each
// side runs on that side's sockets: the client's through the listener, the
// backend's set before connecting.
func TestCongestionControlOfEachSide(t *testing.T) {
	system := systemCongestionControl(t)
	other := otherCongestionControl(t, system)
	t.Run("chosen", func(t *testing.T) {
		fe, be, p := proxiedCongestion(t, Options{
			FrontendCongestionControl: other,
			BackendCongestionControl:  "no-such-algorithm, " + other,
		}, 0)
		if fe != other || be != other {
			t.Errorf("frontend %s, backend %s; want %s on both", fe, be, other)
		}
		for _, side := range []string{"frontend", "backend"} {
			if v := p.counter(p.metrics.congestion.WithLabelValues(side, other)); v != 1 {
				t.Errorf("%s_tcp_congestion_control_info{side=%q,algorithm=%q} = %v, want 1", namespace, side, other, v)
			}
		}
	})
	t.Run("system", func(t *testing.T) {
		fe, be, _ := proxiedCongestion(t, Options{
			FrontendCongestionControl: "system",
			BackendCongestionControl:  "system," + other,
		}, 0)
		if fe != system || be != system {
			t.Errorf("frontend %s, backend %s; want the system's %s on both", fe, be, system)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		fe, be, p := proxiedCongestion(t, Options{}, 0)
		if be != "cubic" && be != "reno" {
			t.Errorf("backend %s, want cubic or, where the kernel refuses it, reno", be)
		}
		if v := p.counter(p.metrics.congestion.WithLabelValues("backend", be)); v != 1 {
			t.Errorf("the metric does not report the backend side's %s", be)
		}
		if v := p.counter(p.metrics.congestion.WithLabelValues("frontend", system)); v != 1 {
			t.Errorf("the metric does not report the frontend side's %s", system)
		}
		// Until the flow carries bulk data to it, a client runs the
		// listener's algorithm: the backend side's, when the two differ.
		if fe != be {
			t.Errorf("frontend %s before any bulk data, want the backend side's %s", fe, be)
		}
	})
}

// TestNearAndFarClients checks the choice a flow makes once it has sent its
// client clientSettleBytes: a client under NearClientRTT keeps the backend
// side's algorithm, one at or beyond it switches to the frontend side's, and
// a flow that sends less never asks.
func TestNearAndFarClients(t *testing.T) {
	system := systemCongestionControl(t)
	other := otherCongestionControl(t, system)
	for _, tc := range []struct {
		name    string
		nearRTT time.Duration
		echo    int
		want    string
		near    float64
		far     float64
	}{
		// Loopback's round trip is tens of microseconds: under a second,
		// and never under one nanosecond (0 whole microseconds).
		{"near", time.Second, 4 * clientSettleBytes, other, 1, 0},
		{"far", time.Nanosecond, 4 * clientSettleBytes, system, 0, 1},
		{"short", time.Nanosecond, clientSettleBytes / 2, other, 0, 0},
		{"off", -1, 4 * clientSettleBytes, system, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe, be, p := proxiedCongestion(t, Options{
				BackendCongestionControl:  other,
				FrontendCongestionControl: "system",
				NearClientRTT:             tc.nearRTT,
			}, tc.echo)
			if fe != tc.want || be != other {
				t.Errorf("frontend %s, backend %s; want %s, %s", fe, be, tc.want, other)
			}
			near, far := p.counter(p.metrics.bulkClients[clientNear]), p.counter(p.metrics.bulkClients[clientFar])
			if near != tc.near || far != tc.far {
				t.Errorf("%s_tcp_bulk_clients_total: near %v, far %v; want %v, %v", namespace, near, far, tc.near, tc.far)
			}
			nearInfo := p.counter(p.metrics.congestion.WithLabelValues("frontend_near", other))
			if wantInfo := map[bool]float64{true: 0, false: 1}[tc.nearRTT < 0]; nearInfo != wantInfo {
				t.Errorf(`%s_tcp_congestion_control_info{side="frontend_near",algorithm=%q} = %v, want %v`, namespace, other, nearInfo, wantInfo)
			}
		})
	}
}

func TestCongestionControlRefusesWhatTheKernelRefuses(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want []string
	}{
		{Options{BackendCongestionControl: "no-such-algorithm"},
			[]string{"--backend-congestion-control", `"no-such-algorithm"`, "no-such-algorithm: not in net.ipv4.tcp_available_congestion_control"}},
		{Options{FrontendCongestionControl: "cubic,,reno"},
			[]string{"--frontend-congestion-control", `"cubic,,reno"`, "empty algorithm name"}},
	} {
		_, err := New(tc.opts)
		if err == nil {
			t.Errorf("%+v: accepted", tc.opts)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not say %q", err, w)
			}
		}
	}
}
