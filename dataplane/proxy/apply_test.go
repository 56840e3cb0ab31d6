package proxy

import (
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/stickylb/stickylb/dataplane/snapshot"
)

// TestApplyKeepsUnchangedRules: rules a snapshot does not change keep their
// state (pool, table, listener) whether they share their backends with the
// snapshot served or were built again equal; a changed rule gets a new one.
func TestApplyKeepsUnchangedRules(t *testing.T) {
	p := newProxy(t, Options{})
	backends := startBackends(t, 2, 9171)
	a, b, c := rule("a", freePort(t), backends), rule("b", freePort(t), backends), rule("c", freePort(t), backends)
	p.apply(t, a, b, c)
	state := func(name string) *ruleState {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.rules["default/"+name]
	}
	sa, sb, sc := state("a"), state("b"), state("c")
	poolA := sa.pool.Load()

	// b built again, equal; c changed.
	b2 := b
	b2.Backends = slices.Clone(b.Backends)
	c2 := c
	c2.IdleTimeout *= 2
	p.apply(t, a, b2, c2)
	if state("a") != sa || state("a").pool.Load() != poolA {
		t.Error("rule a, unchanged, got a new state or pool")
	}
	if state("b") != sb {
		t.Error("rule b, built again but equal, got a new state")
	}
	if state("c") == sc || state("c").rule.IdleTimeout != c2.IdleTimeout {
		t.Error("rule c changed but serves its old state")
	}
	mustBackendOf(t, clientIP(1), c.Port) // its listener serves the new state

	// a goes: its listener closes, the others stay.
	p.apply(t, b2, c2)
	if state("a") != nil {
		t.Error("rule a is gone but still served")
	}
	if conn, err := net.Dial("tcp", frontend(a.Port).String()); err == nil {
		conn.Close()
		t.Error("rule a's listener is still open")
	}
	mustBackendOf(t, clientIP(1), b.Port)
}

// TestApplyRefusesConflicts: a changed rule may not take a listener a rule
// that stays holds, nor one another changed rule takes, and a rule may not
// be in a snapshot twice. A refused snapshot changes nothing.
func TestApplyRefusesConflicts(t *testing.T) {
	p := newProxy(t, Options{})
	backends := startBackends(t, 1, 9172)
	a, b := rule("a", freePort(t), backends), rule("b", freePort(t), backends)
	p.apply(t, a, b)
	apply := func(rules ...snapshot.Rule) error {
		_, err := p.Apply(&snapshot.Snapshot{Version: 99, Rules: rules})
		return err
	}

	onA := b
	onA.Port = a.Port
	if err := apply(a, onA); err == nil || !strings.Contains(err.Error(), "both listen on") {
		t.Errorf("b moved onto a's port: %v", err)
	}
	c := rule("c", b.Port, backends)
	c2 := rule("d", b.Port, backends)
	if err := apply(a, c, c2); err == nil || !strings.Contains(err.Error(), "both listen on") {
		t.Errorf("two new rules on b's freed port: %v", err)
	}
	if err := apply(a, a); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("a rule twice: %v", err)
	}
	noPort := b
	noPort.Port = 0
	if err := apply(a, noPort); err == nil {
		t.Error("a rule without a port was taken")
	}
	if v := p.Version(); v != p.version {
		t.Errorf("a refused snapshot was applied: version %d", v)
	}
	mustBackendOf(t, clientIP(1), a.Port)
	mustBackendOf(t, clientIP(1), b.Port)

	// A rule may take the listener of a rule that goes in the same snapshot.
	p.apply(t, a, c)
	mustBackendOf(t, clientIP(1), c.Port)
}

// TestApplyRetriesListenersOfUnchangedRules: a listener that could not be
// opened is tried again by the next Apply, though its rule did not change.
func TestApplyRetriesListenersOfUnchangedRules(t *testing.T) {
	p := newProxy(t, Options{})
	backends := startBackends(t, 1, 9173)
	port := freePort(t)
	holder, err := net.Listen("tcp", frontend(port).String())
	if err != nil {
		t.Fatal(err)
	}
	r := rule("r", port, backends)
	failed, err := p.Apply(&snapshot.Snapshot{Version: 1, Rules: []snapshot.Rule{r}})
	if err != nil || failed["default/r"] == nil {
		t.Fatalf("the port is taken: failed %v, err %v", failed, err)
	}
	failed, err = p.Apply(&snapshot.Snapshot{Version: 2, Rules: []snapshot.Rule{r}})
	if err != nil || failed["default/r"] == nil {
		t.Fatalf("the port is still taken: failed %v, err %v", failed, err)
	}
	holder.Close()
	failed, err = p.Apply(&snapshot.Snapshot{Version: 3, Rules: []snapshot.Rule{r}})
	if err != nil || len(failed) > 0 {
		t.Fatalf("the port is free: failed %v, err %v", failed, err)
	}
	mustBackendOf(t, clientIP(1), port)
}
