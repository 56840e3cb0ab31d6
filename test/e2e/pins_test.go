package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stickylb/stickylb/internal/netns"
	"github.com/stickylb/stickylb/internal/testbackend"
)

// peerKeyFile writes a fresh peer key, as the chart's Secret holds it.
func peerKeyFile(t *testing.T) string {
	t.Helper()
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "peer-key")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(key)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startPeered starts a replica on bind that peers with the replicas on
// peers (its own address may be among them) with the key in keyFile.
func startPeered(t *testing.T, bind, keyFile string, peers ...string) *process {
	t.Helper()
	list := ""
	for i, p := range peers {
		if i > 0 {
			list += ","
		}
		list += p + ":7946"
	}
	return startStickylbWith(t, bind, nil, "--leader-elect", "--leader-election-namespace", "default", "--drain-timeout", "2s",
		"--peers", list, "--peer-key-file", keyFile)
}

// waitPinsLearned waits until replica to holds at least as many pins for
// the rule as replica from has overriding the table: the announcements
// after a pool change have arrived.
func waitPinsLearned(t *testing.T, from, to *process, rule string) {
	t.Helper()
	testbackend.Eventually(t, 10*time.Second, to.bind+" learns the overriding pins of "+from.bind, func() bool {
		over, ok := from.metric("stickylb_pins_overriding", `rule="`+rule+`"`)
		if !ok {
			return false
		}
		held, _ := to.metric("stickylb_pins", `rule="`+rule+`"`)
		return held >= over
	})
}

// moved lists the clients whose backend differs between two views.
func moved(before, after []string, from int, skip func(before string) bool) (out []string) {
	for i := range before {
		if skip != nil && skip(before[i]) {
			continue
		}
		if after[i] != before[i] {
			out = append(out, fmt.Sprintf("client %s: %s, then %s", testbackend.ClientIP(from+i), before[i], after[i]))
		}
	}
	return out
}

// Clients pinned through one replica keep their backend through the other
// when the pool grows and shrinks, new clients spread over the whole pool,
// and a replica that restarts learns the pins before it serves.
func TestPinsSurvivePoolChangesOnEveryReplica(t *testing.T) {
	ns := namespace(t, "e2e-pins")
	const backendPort, clients = 9511, 1000
	testbackend.StartAt(t, 5, backendPort, netns.BackendIP)
	ips := backendIPs(5)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips[:4]...))
	key := peerKeyFile(t)
	a := startPeered(t, "127.0.0.1", key, "127.0.0.1", "127.0.0.2")
	b := startPeered(t, "127.0.0.2", key, "127.0.0.1", "127.0.0.2")
	testbackend.Eventually(t, 20*time.Second, "the replicas see each other", func() bool {
		na, _ := a.metric("stickylb_peers", "")
		nb, _ := b.metric("stickylb_peers", "")
		return na == 1 && nb == 1
	})
	port := testbackend.FreePort(t, loopback1, loopback2)
	applyRule(t, ns, "web", port, "web", backendPort)
	waitReady(t, ns, "web")
	a.waitServing(t, port)
	b.waitServing(t, port)
	rule := ns + "/web"

	// 1,000 clients through replica 1, on 4 endpoints.
	first := pinsFrom(t, a.frontend(port), 0, clients)
	if s := spread(first); len(s) != 4 {
		t.Fatalf("clients reached %v, want the 4 endpoints", s)
	}

	// A 5th endpoint: the same clients through replica 2 are where they were.
	va, vb := a.snapshotVersion(t), b.snapshotVersion(t)
	pool.set(t, readyEndpoints(ips...))
	a.waitSnapshotAfter(t, va)
	b.waitSnapshotAfter(t, vb)
	waitPinsLearned(t, a, b, rule)
	viaB := pinsFrom(t, b.frontend(port), 0, clients)
	changed := moved(first, viaB, 0, nil)
	over, _ := a.metric("stickylb_pins_overriding", `rule="`+rule+`"`)
	t.Logf("after adding %s: %d of %d clients through replica 2 are on another backend than through replica 1; %v of replica 1's pins override the table", ips[4], len(changed), clients, over)
	if len(changed) > clients/100 {
		reportAll(t, "clients moved by the added endpoint", changed)
	}
	if over < 100 {
		t.Errorf("only %v pins override the table after adding a 5th endpoint: the test proves nothing", over)
	}

	// 1,000 new clients through replica 1: the new endpoint gets its share.
	fresh := pinsFrom(t, a.frontend(port), clients, clients)
	share := float64(spread(fresh)[ips[4].String()]) / clients
	t.Logf("new clients: %.1f%% to the added endpoint (%v)", 100*share, spread(fresh))
	if share < 0.15 || share > 0.25 {
		t.Errorf("the added endpoint got %.1f%% of new clients, want 15-25%%", 100*share)
	}
	all := append(append([]string(nil), first...), fresh...)

	// One of the 5 removed: only its clients move, over the others.
	gone := ips[1].String()
	va, vb = a.snapshotVersion(t), b.snapshotVersion(t)
	pool.set(t, readyEndpoints(ips[0], ips[2], ips[3], ips[4]))
	a.waitSnapshotAfter(t, va)
	b.waitSnapshotAfter(t, vb)
	waitPinsLearned(t, a, b, rule)
	waitPinsLearned(t, b, a, rule)
	afterB := pinsFrom(t, b.frontend(port), 0, 2*clients)
	afterA := pinsFrom(t, a.frontend(port), 0, 2*clients)
	reportAll(t, "clients of other endpoints moved by the removal", moved(all, afterB, 0, func(b string) bool { return b == gone }))
	reportAll(t, "replicas disagree after the removal", moved(afterA, afterB, 0, nil))
	to := map[string]int{}
	for i := range all {
		if all[i] == gone {
			to[afterB[i]]++
		}
	}
	if to[gone] > 0 || len(to) < 3 {
		t.Errorf("the removed endpoint's clients went to %v, want spread over the 4 others", to)
	}

	// Replica 2 restarts: it agrees on every pinned client.
	b.stop(t)
	b = startPeered(t, "127.0.0.2", key, "127.0.0.1", "127.0.0.2")
	b.waitServing(t, port)
	restarted := pinsFrom(t, b.frontend(port), 0, 2*clients)
	reportAll(t, "the restarted replica disagrees", moved(afterA, restarted, 0, nil))
	if held, _ := b.metric("stickylb_pins", `rule="`+rule+`"`); held < over/2 {
		t.Errorf("the restarted replica holds %v pins", held)
	}
}

// With sessionPersistenceTimeoutInMinutes: 0 a rule has no memory, as in
// Azure: adding an endpoint moves about 1/(N+1) of the clients to it, on
// every replica alike.
func TestPinTimeoutZeroIsMaglevOnly(t *testing.T) {
	ns := namespace(t, "e2e-nopins")
	const backendPort, clients = 9512, 600
	testbackend.StartAt(t, 5, backendPort, netns.BackendIP)
	ips := backendIPs(5)
	pool := newBackendPool(t, ns, "web", backendPort, readyEndpoints(ips[:4]...))
	key := peerKeyFile(t)
	a := startPeered(t, "127.0.0.1", key, "127.0.0.1", "127.0.0.2")
	b := startPeered(t, "127.0.0.2", key, "127.0.0.1", "127.0.0.2")
	port := testbackend.FreePort(t, loopback1, loopback2)
	mustKubectl(t, ruleYAML(ns, "web", port, "web", backendPort)+"  sessionPersistenceTimeoutInMinutes: 0\n", "apply", "-f", "-")
	waitReady(t, ns, "web")
	a.waitServing(t, port)
	b.waitServing(t, port)
	before := pinsFrom(t, a.frontend(port), 0, clients)
	va, vb := a.snapshotVersion(t), b.snapshotVersion(t)
	pool.set(t, readyEndpoints(ips...))
	a.waitSnapshotAfter(t, va)
	b.waitSnapshotAfter(t, vb)
	viaB := pinsFrom(t, b.frontend(port), 0, clients)
	viaA := pinsFrom(t, a.frontend(port), 0, clients)
	reportAll(t, "replicas disagree without pins", moved(viaA, viaB, 0, nil))
	toNew, elsewhere := 0, 0
	for i := range before {
		if viaB[i] != before[i] {
			if viaB[i] == ips[4].String() {
				toNew++
			} else {
				elsewhere++
			}
		}
	}
	share := 1.0 / 5
	t.Logf("without pins, adding an endpoint moved %d of %d clients to it, %d elsewhere", toNew, clients, elsewhere)
	if float64(toNew) < (share-3*math.Sqrt(share*(1-share)/clients))*clients {
		t.Errorf("only %d of %d clients moved to the new endpoint without pins", toNew, clients)
	}
	if held, ok := a.metric("stickylb_pins", `rule="`+ns+`/web"`); ok && held > 0 {
		t.Errorf("a rule with timeout 0 holds %v pins", held)
	}
}
