package proxy

import (
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stickylb/stickylb/dataplane/health"
)

// BenchmarkRuleMemory measures what the proxy keeps per rule and per
// backend once a rule is served: its ruleState, backends, pool and rule
// series, with no flow yet (a backend's series come with its first flow).
// It builds 1,000 rules twice, without backends and with 100 each, and
// reports the live heap after a GC: per rule from the first, per backend
// from the difference. Every rule has the same 100 backends, so they share
// one Maglev table and the table stays out of the figures; the snapshot's
// own rules are made before the measurement.
//
//	go test -run=NONE -bench=RuleMemory -benchtime=1x ./dataplane/proxy/
func BenchmarkRuleMemory(b *testing.B) {
	const rules, backends = 1000, 100
	for b.Loop() {
		empty := ruleMemory(b, rules, 0)
		full := ruleMemory(b, rules, backends)
		b.ReportMetric(float64(empty)/rules/1024, "KiB/rule")
		b.ReportMetric(float64(full-empty)/(rules*backends), "B/backend")
	}
}

// ruleMemory is the live heap that serving rules of n backends adds.
func ruleMemory(b *testing.B, rules, n int) int64 {
	b.Helper()
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	s := benchSnapshot(rules, n)
	for i := range s.Rules {
		// One pool for every rule: benchSnapshot numbers backends across rules.
		s.Rules[i].Backends = s.Rules[0].Backends
	}
	status := func(health.Target) (bool, bool) { return true, true }
	// Keep one table alive across the measurement, so it is not counted.
	warm := newRuleState(&s.Rules[0], m)
	warm.rebuild(status, m)

	states := make([]*ruleState, 0, rules)
	before := liveHeap()
	for i := range s.Rules {
		rc := s.Rules[i]
		rs := newRuleState(&rc, m)
		rs.rebuild(status, m)
		states = append(states, rs)
	}
	after := liveHeap()
	runtime.KeepAlive(states)
	runtime.KeepAlive(warm)
	runtime.KeepAlive(s)
	runtime.KeepAlive(m) // as the registry keeps it: its vectors index the series
	if len(states) != rules || (n > 0 && len(states[rules-1].pool.Load().picks) != n) {
		b.Fatalf("%d rules built", len(states))
	}
	return after - before
}

// liveHeap is the heap in use after a full collection.
func liveHeap() int64 {
	var ms runtime.MemStats
	for range 3 {
		// Cleanups (the table cache's) run after a collection, on their own goroutine.
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}
