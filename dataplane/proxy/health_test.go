package proxy

import (
	"net"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// httpProbe probes /healthz on port 9100 every interval, flipping after threshold results.
func httpProbe(interval time.Duration, threshold int, allProbedUp bool) ruleOpt {
	return func(r *snapshot.Rule) {
		r.Probe = &snapshot.Probe{Protocol: snapshot.ProbeHTTP, Port: 9100, Path: "/healthz", Interval: interval, Threshold: threshold}
		r.AllProbedUp = allProbedUp
	}
}

func TestProbeDownStopsNewFlowsAndKeepsEstablishedOnes(t *testing.T) {
	backends := startBackends(t, 3, 9020)
	for _, b := range backends {
		b.ServeHealth(t, 9100)
	}
	port := freePort(t)
	p := newProxy(t, Options{})
	const interval, threshold = 100 * time.Millisecond, 3
	p.apply(t, rule("web", port, backends, httpProbe(interval, threshold, false), protocols(snapshot.TCP, snapshot.UDP)))

	// Find a client pinned to 127.0.1.1, with a TCP flow and a UDP session.
	victim := backends[0]
	client := -1
	for i := range 100 {
		if mustBackendOf(t, clientIP(i), port) == victim.Name {
			client = i
			break
		}
	}
	if client < 0 {
		t.Fatal("no client pinned to 127.0.1.1")
	}
	_, established, err := backendOf(clientIP(client), port)
	if err != nil {
		t.Fatal(err)
	}
	defer established.Close()
	udp := udpClient(t, clientIP(client), port)
	if got, err := udpExchange(t, udp); err != nil || got != victim.Name {
		t.Fatalf("UDP session went to %q (%v), want %s", got, err, victim.Name)
	}

	victim.Healthy.Store(false)
	took := eventually(t, interval*threshold+time.Second, "probe-down takes the backend out", func() bool {
		return mustBackendOf(t, clientIP(client), port) != victim.Name
	})
	t.Logf("probe down after %v (interval %v x threshold %d)", took, interval, threshold)
	echo(t, established, "established flows continue")
	// The UDP session (same source port) moves on its next datagram.
	if got, err := udpExchange(t, udp); err != nil || got == victim.Name {
		t.Fatalf("UDP session after probe-down answered by %q (%v)", got, err)
	}
	if got := p.counter(p.metrics.probeStatus.WithLabelValues("default/web", victim.Addr.String())); got != 0 {
		t.Errorf("health_probe_status = %v, want 0", got)
	}
	healthy, _ := p.Healthy("default/web")
	if down, ok := p.ProbedDown("default/web"); !ok || down != 1 || healthy+down != len(backends) {
		t.Errorf("ProbedDown = %d (served %v), Healthy = %d: want 1 down of %d", down, ok, healthy, len(backends))
	}

	victim.Healthy.Store(true)
	eventually(t, interval*threshold+time.Second, "probe-up brings the backend back", func() bool {
		return mustBackendOf(t, clientIP(client), port) == victim.Name
	})
	if down, _ := p.ProbedDown("default/web"); down != 0 {
		t.Errorf("ProbedDown = %d after the probe came back up", down)
	}
}

func TestAllProbedDown(t *testing.T) {
	for _, allProbedUp := range []bool{false, true} {
		name := map[bool]string{false: "AllProbedDown refuses new flows", true: "AllProbedUp sends to all"}[allProbedUp]
		t.Run(name, func(t *testing.T) {
			backends := startBackends(t, 2, 9021)
			for _, b := range backends {
				b.ServeHealth(t, 9100)
			}
			port := freePort(t)
			p := newProxy(t, Options{})
			p.apply(t, rule("web", port, backends, httpProbe(50*time.Millisecond, 1, allProbedUp), protocols(snapshot.TCP, snapshot.UDP)))
			_, established, err := backendOf(clientIP(1), port)
			if err != nil {
				t.Fatal(err)
			}
			defer established.Close()
			for _, b := range backends {
				b.Healthy.Store(false)
			}
			eventually(t, 2*time.Second, "both probed down", func() bool {
				return p.counter(p.metrics.probeStatus.WithLabelValues("default/web", backends[0].Addr.String())) == 0 &&
					p.counter(p.metrics.probeStatus.WithLabelValues("default/web", backends[1].Addr.String())) == 0
			})
			echo(t, established, "established TCP continues either way")
			_, c, err := backendOf(clientIP(2), port)
			udpName, udpErr := udpExchange(t, udpClient(t, clientIP(2), port))
			if allProbedUp {
				if err != nil || udpErr != nil {
					t.Fatalf("AllProbedUp refused: tcp %v, udp %v", err, udpErr)
				}
				c.Close()
				_ = udpName
				return
			}
			if err == nil {
				c.Close()
				t.Fatal("AllProbedDown accepted a new TCP flow")
			}
			if udpErr == nil {
				t.Fatalf("AllProbedDown answered a UDP datagram from %s", udpName)
			}
			if got := p.counter(p.metrics.refused.WithLabelValues("default/web", refusedNoBackend)); got < 2 {
				t.Errorf("refused{no_healthy_backend} = %v, want >= 2", got)
			}
		})
	}
}

func TestDrainingBackendTakesNoNewFlows(t *testing.T) {
	backends := startBackends(t, 3, 9022)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends, protocols(snapshot.TCP, snapshot.UDP)))
	before := backendsOf(t, 60, port)
	client := -1
	for i, b := range before {
		if b == backends[1].Name {
			client = i
			break
		}
	}
	_, flow, err := backendOf(clientIP(client), port)
	if err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	udp := udpClient(t, clientIP(client), port)
	if _, err := udpExchange(t, udp); err != nil {
		t.Fatal(err)
	}

	p.apply(t, rule("web", port, backends, protocols(snapshot.TCP, snapshot.UDP), func(r *snapshot.Rule) {
		r.Backends[1].Draining = true
	}))
	after := backendsOf(t, 60, port)
	for i := range before {
		if after[i] == backends[1].Name {
			t.Errorf("%s got a new flow on the draining backend", clientIP(i))
		}
		if before[i] != backends[1].Name && after[i] != before[i] {
			t.Errorf("%s moved though its backend is not draining", clientIP(i))
		}
	}
	echo(t, flow, "draining flows finish")
	if got, err := udpExchange(t, udp); err != nil || got != backends[1].Name {
		t.Errorf("UDP session on a draining backend: %q, %v; want it kept", got, err)
	}
}

func TestUDPSessions(t *testing.T) {
	backends := startBackends(t, 3, 9023)
	port := freePort(t)
	p := newProxy(t, Options{MaxUDPSessionsPerClient: 2})
	p.apply(t, rule("dns", port, backends, protocols(snapshot.UDP), func(r *snapshot.Rule) {
		r.IdleTimeout = 200 * time.Millisecond
	}))
	a := udpClient(t, clientIP(1), port)
	first, err := udpExchange(t, a)
	if err != nil {
		t.Fatal(err)
	}
	sessions := func() float64 { return p.counter(p.metrics.udpSessions.WithLabelValues("default/dns")) }
	if sessions() != 1 {
		t.Fatalf("udp_sessions = %v, want 1", sessions())
	}
	eventually(t, 2*time.Second, "idle session expires", func() bool { return sessions() == 0 })
	if got, err := udpExchange(t, a); err != nil || got != first {
		t.Fatalf("after expiry the client returned to %q (%v), want %s", got, err, first)
	}

	// Per-source cap: a third source port of the same IP is dropped.
	b := udpClient(t, clientIP(1), port)
	if _, err := udpExchange(t, b); err != nil {
		t.Fatal(err)
	}
	c := udpClient(t, clientIP(1), port)
	if _, err := udpExchange(t, c); err == nil {
		t.Fatal("a third session from one IP was served; cap is 2")
	}
	if _, err := udpExchange(t, udpClient(t, clientIP(2), port)); err != nil {
		t.Fatalf("another client refused: %v", err)
	}
	if got := p.counter(p.metrics.refused.WithLabelValues("default/dns", refusedClientLimit)); got != 1 {
		t.Errorf("refused{client_limit} = %v, want 1", got)
	}

	// The session moves when its backend leaves the pool.
	var rest []*backendServer
	for _, s := range backends {
		if s.Name != first {
			rest = append(rest, s)
		}
	}
	p.apply(t, rule("dns", port, rest, protocols(snapshot.UDP)))
	if got, err := udpExchange(t, a); err != nil || got == first {
		t.Fatalf("after its backend left, the session answered from %q (%v)", got, err)
	}
}

func TestUDPRepliesComeFromTheFrontend(t *testing.T) {
	backends := startBackends(t, 1, 9024)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("dns", port, backends, protocols(snapshot.UDP)))
	// An unconnected socket sees the reply's source address.
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: clientIP(3).AsSlice()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	front := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}
	if _, err := c.WriteToUDP([]byte("q"), front); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 64)
	_, from, err := c.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	if from.String() != front.String() {
		t.Errorf("reply from %s, want the frontend %s", from, front)
	}
}
