package e2e

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	lbv1alpha1 "github.com/stickylb/stickylb/api/v1alpha1"
	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// A rule applied with kubectl becomes Ready once stickylb runs, kubectl wait
// sees it, and kubectl get shows the printer columns.
func TestKubectlWaitReadyAndGetColumns(t *testing.T) {
	ns := namespace(t, "e2e-ready")
	const backendPort = 9501
	testbackend.StartAt(t, 3, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(3)...))
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)

	// Nothing serves the rule yet, so the wait must not succeed.
	if out, err := kubectl(t, "", "-n", ns, "wait", "--for=condition=Ready", "lbr/web", "--timeout=1s"); err == nil {
		t.Fatalf("kubectl wait succeeded with no stickylb running: %s", out)
	}

	p := startStickylb(t, "127.0.0.1")
	start := time.Now()
	waitReady(t, ns, "web")
	t.Logf("Ready %v after stickylb answered /readyz", time.Since(start).Round(time.Millisecond))

	out := mustKubectl(t, "", "-n", ns, "get", "lbr")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl get lbr printed %d lines, want a header and one rule:\n%s", len(lines), out)
	}
	if header, want := strings.Fields(lines[0]), []string{"NAME", "PROTOCOL", "PORT", "PERSISTENCE", "HEALTHY", "READY", "AGE"}; !slices.Equal(header, want) {
		t.Errorf("kubectl get lbr columns %v, want %v", header, want)
	}
	row := strings.Fields(lines[1])
	if want := []string{"web", "TCP", strconv.Itoa(int(port)), "ClientIP", "3", "True"}; len(row) != 7 || !slices.Equal(row[:6], want) {
		t.Errorf("kubectl get lbr row %v, want %v and an age", row, want)
	}

	r := rule(t, ns, "web")
	if r.Status.Backends != (lbv1alpha1.BackendCounts{Total: 3, Ready: 3, Healthy: 3}) {
		t.Errorf("status.backends = %+v, want 3/3/3", r.Status.Backends)
	}
	if a := r.Status.Frontend.Addresses; len(a) == 0 || a[0] != "127.0.0.1" {
		t.Errorf("status.frontend.addresses = %v, want the bind address 127.0.0.1 first", a)
	}
	got := testbackend.MustBackendOf(t, testbackend.ClientIP(0), p.frontend(port))
	if !slices.Contains(backendIPs(3), netipOrZero(got)) {
		t.Errorf("the frontend relayed to %q, not a backend of the pool", got)
	}
}

// 200 clients each reach the same backend on every connection, and the
// clients cover every backend.
func TestClientsArePinnedAndSpread(t *testing.T) {
	ns := namespace(t, "e2e-pinning")
	const backendPort, backends, clients = 9502, 4, 200
	testbackend.StartAt(t, backends, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(backends)...))
	p := startStickylb(t, "127.0.0.1")
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)
	waitReady(t, ns, "web")
	p.waitServing(t, port)

	first := pins(t, p.frontend(port), clients)
	var moved []string
	for round := 2; round <= 3; round++ {
		again := pins(t, p.frontend(port), clients)
		for i := range again {
			if again[i] != first[i] {
				moved = append(moved, fmt.Sprintf("connection %d of client %s reached %s, the first %s", round, testbackend.ClientIP(i), again[i], first[i]))
			}
		}
	}
	reportAll(t, "clients not pinned", moved)
	s := spread(first)
	t.Logf("%d clients per backend: %v", clients, s)
	for _, b := range backendIPs(backends) {
		if s[b.String()] == 0 {
			t.Errorf("no client reached backend %s: %v", b, s)
		}
	}
	if len(s) != backends {
		t.Errorf("clients reached %v, want exactly the %d backends of the pool", s, backends)
	}
}

// Without pins (sessionPersistenceTimeoutInMinutes: 0, Azure's behaviour),
// removing an endpoint from the EndpointSlice moves only its clients (plus
// under 1% of the others: Maglev's own disruption); adding one moves about
// 1/(N+1) of the clients, to the new endpoint.
func TestEndpointChurnMovesOnlyExpectedClients(t *testing.T) {
	ns := namespace(t, "e2e-churn")
	const backendPort, clients = 9503, 1000
	testbackend.StartAt(t, 6, backendPort, netns.BackendIP)
	ips := backendIPs(6)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips[:5]...))
	p := startStickylb(t, "127.0.0.1")
	port := testbackend.FreePort(t, loopback1, loopback2)
	mustKubectl(t, ruleYAML(ns, "web", port, "web", backendPort)+"  sessionPersistenceTimeoutInMinutes: 0\n", "apply", "-f", "-")
	waitReady(t, ns, "web")
	p.waitServing(t, port)
	front := p.frontend(port)

	v := p.snapshotVersion(t)
	before := pins(t, front, clients)
	if s := spread(before); len(s) != 5 {
		t.Fatalf("clients reached %v, want the 5 endpoints", s)
	}

	// Remove ips[1].
	gone := ips[1].String()
	pool.set(t, readyEndpoints(ips[0], ips[2], ips[3], ips[4]))
	p.waitSnapshotAfter(t, v)
	v = p.snapshotVersion(t)
	afterRemove := pins(t, front, clients)
	ofGone, others, othersMoved := 0, 0, 0
	var stale []string
	for i := range afterRemove {
		switch {
		case afterRemove[i] == gone:
			stale = append(stale, testbackend.ClientIP(i).String())
		case before[i] == gone:
			ofGone++
		default:
			others++
			if afterRemove[i] != before[i] {
				othersMoved++
			}
		}
	}
	reportAll(t, "clients still reaching the removed endpoint "+gone, stale)
	t.Logf("remove: %d clients of %s moved; %d of the other %d moved", ofGone, gone, othersMoved, others)
	if ofGone == 0 {
		t.Errorf("the removed endpoint had no clients: the test proves nothing")
	}
	if float64(othersMoved) >= 0.01*float64(others) {
		t.Errorf("removing %s moved %d of %d clients of other endpoints, want under 1%%", gone, othersMoved, others)
	}

	// Add ips[5] to the 4 left.
	added := ips[5].String()
	pool.set(t, readyEndpoints(ips[0], ips[2], ips[3], ips[4], ips[5]))
	p.waitSnapshotAfter(t, v)
	afterAdd := pins(t, front, clients)
	moved, toNew := 0, 0
	for i := range afterAdd {
		if afterAdd[i] != afterRemove[i] {
			moved++
			if afterAdd[i] == added {
				toNew++
			}
		}
	}
	const n = 4 // endpoints before the add
	share := 1.0 / (n + 1)
	t.Logf("add: %d of %d clients moved, %d of them to the new endpoint %s (ideal %.0f)", moved, clients, toNew, added, share*clients)
	if frac := float64(moved) / clients; frac > share+0.01 {
		t.Errorf("adding an endpoint to %d moved %.1f%% of clients, want at most 1/%d + 1%%", n, 100*frac, n+1)
	}
	if float64(moved-toNew) >= 0.01*clients {
		t.Errorf("adding %s moved %d clients between the old endpoints, want under 1%%", added, moved-toNew)
	}
	// The new endpoint takes its share of clients (a binomial sample of 1000:
	// allow three standard deviations below 1/(N+1)).
	if float64(toNew) < (share-3*math.Sqrt(share*(1-share)/clients))*clients {
		t.Errorf("only %d of %d clients moved to the new endpoint, want about 1/%d", toNew, clients, n+1)
	}
}

// An endpoint that turns not ready (ready false, terminating false) takes no
// new clients, while a connection already through it keeps working; ready
// again, it gets exactly its clients back.
func TestNotReadyEndpointKeepsItsConnections(t *testing.T) {
	ns := namespace(t, "e2e-notready")
	const backendPort, clients = 9504, 200
	testbackend.StartAt(t, 3, backendPort, netns.BackendIP)
	ips := backendIPs(3)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips...))
	p := startStickylb(t, "127.0.0.1")
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)
	waitReady(t, ns, "web")
	p.waitServing(t, port)
	front := p.frontend(port)

	before := pins(t, front, clients)
	victim := ips[1].String()
	k := slices.Index(before, victim)
	if k < 0 {
		t.Fatalf("no client reached %s: %v", victim, spread(before))
	}
	name, held, err := testbackend.BackendOf(testbackend.ClientIP(k), front)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if name != victim {
		t.Fatalf("client %s reached %s, before %s", testbackend.ClientIP(k), name, victim)
	}
	if err := echo(held, "before"); err != nil {
		t.Fatal(err)
	}

	pool.set(t, []endpoint{{addr: ips[0], ready: true}, {addr: ips[1], ready: false}, {addr: ips[2], ready: true}})
	// status.backends.ready comes from this process's dataplane state, which
	// it stores once the proxy has applied it.
	waitStatus(t, ns, "web", 20*time.Second, "backends 3 total, 2 ready", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return r.Status.Backends.Total == 3 && r.Status.Backends.Ready == 2
	})
	var wrong []string
	during := pins(t, front, clients)
	for i, b := range during {
		if b == victim {
			wrong = append(wrong, testbackend.ClientIP(i).String())
		}
	}
	reportAll(t, "new connections reaching the not-ready endpoint "+victim, wrong)
	if err := echo(held, "established connection survives not-ready"); err != nil {
		t.Errorf("the connection through %s broke when it turned not ready: %v", victim, err)
	}
	waitStatus(t, ns, "web", 10*time.Second, "2 healthy backends, Ready", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return r.Status.Backends == lbv1alpha1.BackendCounts{Total: 3, Ready: 2, Healthy: 2} && readyAt(r)
	})

	// Ready again: every client stays where it is pinned. The victim's
	// clients were pinned again while it was not ready, and keep their
	// new backend; the others never moved.
	pool.set(t, readyEndpoints(ips...))
	waitStatus(t, ns, "web", 20*time.Second, "backends 3/3/3 again", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return r.Status.Backends == lbv1alpha1.BackendCounts{Total: 3, Ready: 3, Healthy: 3}
	})
	var changed []string
	for i, b := range pins(t, front, clients) {
		if b != during[i] || (before[i] != victim && b != before[i]) {
			changed = append(changed, fmt.Sprintf("client %s reaches %s; %s before, %s while %s was not ready", testbackend.ClientIP(i), b, before[i], during[i], victim))
		}
	}
	reportAll(t, "with the endpoint ready again, clients moved off their pinned backend", changed)
	if err := echo(held, "still"); err != nil {
		t.Errorf("held connection: %v", err)
	}
}

// kubectl delete closes the rule's listener within a few seconds; another
// rule keeps serving.
func TestDeletedRuleClosesItsListener(t *testing.T) {
	ns := namespace(t, "e2e-delete")
	const backendPort = 9505
	testbackend.StartAt(t, 2, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(2)...))
	p := startStickylb(t, "127.0.0.1")
	webPort, apiPort := testbackend.FreePort(t, loopback1, loopback2), testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", webPort, "web", backendPort)
	applyRule(t, ns, "api", apiPort, "web", backendPort)
	waitReady(t, ns, "web")
	waitReady(t, ns, "api")
	p.waitServing(t, webPort)
	p.waitServing(t, apiPort)

	out := mustKubectl(t, "", "-n", ns, "delete", "lbr", "web")
	if !strings.Contains(out, "deleted") {
		t.Errorf("kubectl delete printed %q", out)
	}
	start := time.Now()
	for {
		c, err := testbackend.Dial(testbackend.ClientIP(1), p.frontend(webPort))
		if err == nil {
			c.Close()
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			t.Logf("listener closed %v after kubectl delete returned (%v)", time.Since(start).Round(time.Millisecond), err)
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("port %d of the deleted rule still not refusing connections 5s after kubectl delete (last dial: %v)", webPort, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := kubectl(t, "", "-n", ns, "get", "lbr", "web"); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Errorf("kubectl get lbr web after delete: %v", err)
	}
	testbackend.MustBackendOf(t, testbackend.ClientIP(1), p.frontend(apiPort))
}

// startPair starts stickylb on 127.0.0.1 and waits until it leads, then a
// second replica on 127.0.0.2 that stands by.
func startPair(t *testing.T) (leader, standby *process) {
	t.Helper()
	a := startStickylb(t, "127.0.0.1")
	testbackend.Eventually(t, 30*time.Second, "stickylb on 127.0.0.1 leads", func() bool { return a.leaderStatus() == 1 })
	b := startStickylb(t, "127.0.0.2")
	testbackend.Eventually(t, 10*time.Second, "stickylb on 127.0.0.2 reports itself a standby", func() bool { return b.leaderStatus() == 0 })
	if s := a.leaderStatus(); s != 1 {
		t.Fatalf("127.0.0.1 leader status %v after the second replica started", s)
	}
	return a, b
}

// Two replicas: one leads, both serve, and they agree on every client's backend.
func TestTwoReplicasAgreeOnEveryClient(t *testing.T) {
	ns := namespace(t, "e2e-replicas")
	const backendPort, backends, clients = 9506, 4, 200
	testbackend.StartAt(t, backends, backendPort, netns.BackendIP)
	newBackendPool(t, ns, "web", backendPort, readyEndpoints(backendIPs(backends)...))
	a, b := startPair(t)
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)
	waitReady(t, ns, "web")
	a.waitServing(t, port)
	b.waitServing(t, port)

	leaders := 0
	for _, p := range []*process{a, b} {
		if p.leaderStatus() == 1 {
			leaders++
		}
	}
	if leaders != 1 {
		t.Errorf("%d replicas lead, want 1", leaders)
	}
	if addrs := rule(t, ns, "web").Status.Frontend.Addresses; len(addrs) == 0 || addrs[0] != a.bind {
		t.Errorf("status.frontend.addresses = %v, want the leader's %s first", addrs, a.bind)
	}
	pa := pins(t, a.frontend(port), clients)
	pb := pins(t, b.frontend(port), clients)
	var disagree []string
	for i := range pa {
		if pa[i] != pb[i] {
			disagree = append(disagree, fmt.Sprintf("client %s: replica %s sends it to %s, replica %s to %s", testbackend.ClientIP(i), a.bind, pa[i], b.bind, pb[i]))
		}
	}
	reportAll(t, "replicas disagree", disagree)
	if s := spread(pa); len(s) != backends {
		t.Errorf("clients reached %v, want all %d backends", s, backends)
	}
}

// The leader killed with SIGKILL cannot release its lease; the standby takes
// over once the lease expires and writes status, including a change made
// after the kill.
func TestLeaderKilledStandbyTakesOverStatus(t *testing.T) {
	ns := namespace(t, "e2e-failover")
	const backendPort = 9507
	testbackend.StartAt(t, 3, backendPort, netns.BackendIP)
	ips := backendIPs(3)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips...))
	a, b := startPair(t)
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)
	waitReady(t, ns, "web")
	waitStatus(t, ns, "web", 10*time.Second, "written by the leader on 127.0.0.1", func(r *lbv1alpha1.LoadBalancerRule) bool {
		return len(r.Status.Frontend.Addresses) > 0 && r.Status.Frontend.Addresses[0] == a.bind && r.Status.Backends.Total == 3
	})
	b.waitServing(t, port)
	v := b.snapshotVersion(t)

	a.kill()
	killed := time.Now()
	pool.set(t, readyEndpoints(ips[0], ips[1]))
	b.waitSnapshotAfter(t, v)
	// The standby serves the change before it leads: the dataplane is not leader-elected.
	var stale []string
	for i, got := range pins(t, b.frontend(port), 50) {
		if got == ips[2].String() {
			stale = append(stale, testbackend.ClientIP(i).String())
		}
	}
	reportAll(t, "clients of the standby reaching the removed endpoint "+ips[2].String(), stale)

	r := waitStatus(t, ns, "web", 30*time.Second-time.Since(killed), "status written by the survivor on 127.0.0.2", func(r *lbv1alpha1.LoadBalancerRule) bool {
		addrs := r.Status.Frontend.Addresses
		return len(addrs) > 0 && addrs[0] == b.bind && !slices.Contains(addrs, a.bind) &&
			r.Status.Backends.Total == 2 && readyAt(r)
	})
	t.Logf("survivor wrote status %v after SIGKILL of the leader: addresses %v, backends %+v",
		time.Since(killed).Round(time.Millisecond), r.Status.Frontend.Addresses, r.Status.Backends)
	if s := b.leaderStatus(); s != 1 {
		t.Errorf("survivor's leader_election_master_status = %v, want 1", s)
	}
}

// netipOrZero parses a backend name.
func netipOrZero(s string) netip.Addr {
	a, _ := netip.ParseAddr(s)
	return a
}

// reportAll fails the test once for a list of cases, showing the first few.
func reportAll(t *testing.T, what string, cases []string) {
	t.Helper()
	if len(cases) == 0 {
		return
	}
	t.Errorf("%s: %d cases, first: %s", what, len(cases), strings.Join(cases[:min(5, len(cases))], "; "))
}
