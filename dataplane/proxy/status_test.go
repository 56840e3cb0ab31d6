package proxy

import (
	"math"
	"testing"
	"time"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// View shows each backend as the replica serves it: probe state, draining,
// its share of the table, the clients pinned to it and its open flows; and
// the counts add up to what clients actually did.
func TestViewShowsEachBackend(t *testing.T) {
	backends := startBackends(t, 4, 9073)
	for _, b := range backends {
		b.ServeHealth(t, 9100)
	}
	port := freePort(t)
	p := newProxy(t, Options{})
	const interval = 50 * time.Millisecond
	draining := func(r *snapshot.Rule) { r.Backends[3].Draining = true }
	p.apply(t, rule("web", port, backends, httpProbe(interval, 1, false), pinFor(time.Hour), draining))
	backends[2].Healthy.Store(false)
	eventually(t, 2*time.Second, "the third backend probed down", func() bool {
		v, err := p.View("default/web")
		return err == nil && v.Backends[2].Probe == ProbeDown && v.Healthy == 2
	})

	const clients = 120
	reached := backendsOf(t, clients, port) // pins every client
	want := map[string]int{}
	for _, b := range reached {
		want[b]++
	}
	_, open, err := backendOf(clientIP(0), port)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()

	first := backendIndex(t, backends, reached[0])
	// The connections backendsOf closed leave the count as their proxy
	// side sees the close.
	var v RuleView
	eventually(t, 5*time.Second, "only the open connection counts", func() bool {
		if v, err = p.View("default/web"); err != nil {
			return false
		}
		flows := 0
		for _, b := range v.Backends {
			flows += b.Flows
		}
		return v.Backends[first].Flows == 1 && flows == 1
	})
	if v.Rule != "default/web" || v.Snapshot != p.version || len(v.Listeners) != 1 || !v.Listeners[0].Open {
		t.Fatalf("view = %+v", v)
	}
	if v.Pins != clients {
		t.Errorf("pins = %d, want %d", v.Pins, clients)
	}
	var shares float64
	for i, b := range v.Backends {
		if b.Address != backends[i].Addr.String() {
			t.Fatalf("backend %d is %s, want %s", i, b.Address, backends[i].Addr)
		}
		shares += b.Share
		if got := b.Pinned; got != want[backends[i].Name] {
			t.Errorf("%s: %d pinned, but %d clients reached it", b.Address, got, want[backends[i].Name])
		}
		switch i {
		case 0, 1: // serving: half the table each
			if b.Probe != ProbeUp || b.Draining || math.Abs(b.Share-0.5) > 0.01 {
				t.Errorf("serving backend: %+v", b)
			}
		case 2:
			if b.Probe != ProbeDown || b.Share != 0 {
				t.Errorf("probed-down backend: %+v", b)
			}
		case 3:
			if !b.Draining || b.Share != 0 {
				t.Errorf("draining backend: %+v", b)
			}
		}
	}
	if math.Abs(shares-1) > 1e-9 {
		t.Errorf("shares add up to %v", shares)
	}
	for i, b := range v.Backends {
		if i != first && b.Flows != 0 {
			t.Errorf("%s: %d flows, want none", b.Address, b.Flows)
		}
	}
	if _, err := p.View("default/none"); err == nil {
		t.Error("a rule not served has a view")
	}
}

func backendIndex(t *testing.T, backends []*backendServer, name string) int {
	t.Helper()
	for i, b := range backends {
		if b.Name == name {
			return i
		}
	}
	t.Fatalf("no backend %s", name)
	return -1
}
