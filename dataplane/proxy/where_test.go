package proxy

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// Where answers exactly what new connections get: from the table, from a
// pin that overrides it after the pool changed, and without touching pins.
func TestWhereMatchesNewConnections(t *testing.T) {
	backends := startBackends(t, 5, 9071)
	port := freePort(t)
	p := newProxy(t, Options{})
	p.apply(t, rule("web", port, backends[:4], pinFor(time.Hour), protocols(snapshot.TCP, snapshot.UDP)))
	const clients = 200
	before := backendsOf(t, clients, port)
	p.apply(t, rule("web", port, backends, pinFor(time.Hour), protocols(snapshot.TCP, snapshot.UDP)))
	check := func(n int, wantPinned bool) (overrides int) {
		t.Helper()
		var held float64
		if wantPinned {
			held = ruleMetric(t, p, "stickylb_pins", "default/web")
		}
		answers := make([]Answer, n)
		for i := range n {
			a, err := p.Where("default/web", clientIP(i), snapshot.TCP)
			if err != nil {
				t.Fatal(err)
			}
			answers[i] = a
			if a.Pinned != wantPinned {
				t.Fatalf("client %s: pinned %v, want %v", clientIP(i), a.Pinned, wantPinned)
			}
			if a.Overrides {
				overrides++
				if a.TablePick == a.Backends[0] {
					t.Errorf("client %s: overrides the table but both say %s", clientIP(i), a.TablePick)
				}
			}
			if len(a.Backends) != maxDialAttempts {
				t.Errorf("client %s: preference %v", clientIP(i), a.Backends)
			}
		}
		if wantPinned {
			if got := ruleMetric(t, p, "stickylb_pins", "default/web"); got != held {
				t.Fatalf("Where changed the pins: %v, then %v", held, got)
			}
		}
		got := backendsOf(t, n, port)
		for i := range got {
			if got[i] != host(answers[i].Backends[0]) {
				t.Errorf("client %s: Where says %s, its connection reached %s", clientIP(i), answers[i].Backends[0], got[i])
			}
		}
		return overrides
	}
	if o := check(clients, true); o == 0 {
		t.Errorf("no pin overrides the table after a 5th backend: the test proves nothing")
	}
	for i := range before {
		if a, _ := p.Where("default/web", clientIP(i), snapshot.TCP); host(a.Backends[0]) != before[i] {
			t.Errorf("client %s pinned to %s, answered %s", clientIP(i), before[i], a.Backends[0])
		}
	}
	if _, err := p.Where("default/web", clientIP(0), snapshot.UDP); err != nil {
		t.Errorf("UDP: %v", err)
	}
	// Clients never seen have no pin; asking does not make one.
	fresh := clientIP(400)
	if a, _ := p.Where("default/web", fresh, snapshot.TCP); a.Pinned || a.Overrides || a.Backends[0] != a.TablePick {
		t.Errorf("a new client: %+v", a)
	}
	if a, _ := p.Where("default/web", fresh, snapshot.TCP); a.Pinned {
		t.Errorf("asking pinned the client: %+v", a)
	}

	// Without pins the answer is the table's, and None has no single answer.
	p.apply(t, rule("web", port, backends, protocols(snapshot.TCP, snapshot.UDP)))
	check(50, false)
	p.apply(t, rule("web", port, backends, persistence(snapshot.PersistenceNone)))
	if _, err := p.Where("default/web", clientIP(0), snapshot.TCP); !errors.Is(err, ErrNoSingleAnswer) {
		t.Errorf("None: %v", err)
	}
	if _, err := p.Where("default/other", clientIP(0), snapshot.TCP); err == nil {
		t.Errorf("a rule not served has an answer")
	}
}

// host is the address of a backend named ip:port, as the test backends name themselves.
func host(backend string) string { return netip.MustParseAddrPort(backend).Addr().String() }
