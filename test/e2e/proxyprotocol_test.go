package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/testbackend"
)

// A V2 rule through the real binary: backends that require the PROXY
// protocol header see every client as itself, with its own source port,
// and the frontend it reached; the TCP probes send a header too, so the
// backends stay healthy.
func TestProxyProtocolShowsBackendsTheClient(t *testing.T) {
	ns := namespace(t, "e2e-proxyprotocol")
	const backendPort, clients = 9513, 100
	ips := backendIPs(3)
	for _, ip := range ips {
		testbackend.StartHeaderServer(t, netip.AddrPortFrom(ip, backendPort))
	}
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips...))
	p := startStickylb(t, "127.0.0.1")
	port := testbackend.FreePort(t, loopback1, loopback2)
	mustKubectl(t, ruleYAML(ns, "web", port, "web", backendPort)+`  proxyProtocol: V2
  probe:
    protocol: TCP
    intervalInSeconds: 5
`, "apply", "-f", "-")
	probesFrom := time.Now()
	waitReady(t, ns, "web")
	p.waitServing(t, port)
	front := p.frontend(port)
	reached := map[string]int{}
	for i := range clients {
		name, client, dest, local, c, err := testbackend.SeenAs(testbackend.ClientIP(i), front)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		reached[name]++
		if client != local.String() {
			t.Errorf("client %s appeared at %s as %s", local, name, client)
		}
		if dest != front.String() {
			t.Errorf("client %s: destination %s, want the frontend %s", local, dest, front)
		}
	}
	if len(reached) != len(ips) {
		t.Errorf("%d clients reached %v, want all %d backends", clients, reached, len(ips))
	}
	// Each backend has been probed by now (the first probe comes within
	// one interval, and one failure would mark it down).
	time.Sleep(time.Until(probesFrom.Add(6 * time.Second)))
	if r := rule(t, ns, "web"); r.Status.Backends.Healthy != int32(len(ips)) {
		t.Errorf("status.backends %+v: the probes did not pass against backends that require the header", r.Status.Backends)
	}
}
