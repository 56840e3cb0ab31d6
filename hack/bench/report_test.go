package main

import (
	"net/netip"
	"strings"
	"testing"
)

const sampleBench = `goos: linux
pkg: github.com/stickylb/stickylb/dataplane/maglev
BenchmarkLookup-2              	404038650	         3.111 ns/op	       0 B/op	       0 allocs/op
BenchmarkBuild1000-2           	     174	   6738055 ns/op	  294992 B/op	       4 allocs/op
PASS
pkg: github.com/stickylb/stickylb/dataplane/proxy
BenchmarkLookup-2              	1000	         99 ns/op	       8 B/op	       1 allocs/op
`

func TestParseBench(t *testing.T) {
	got := parseBench(strings.NewReader(sampleBench))
	lookup := got[maglevPkg+".BenchmarkLookup"]
	if lookup.nsPerOp != 3.111 || !lookup.hasAllocs || lookup.allocsPerOp != 0 {
		t.Errorf("maglev BenchmarkLookup = %+v", lookup)
	}
	if b := got[maglevPkg+".BenchmarkBuild1000"]; b.nsPerOp != 6738055 || b.allocsPerOp != 4 {
		t.Errorf("BenchmarkBuild1000 = %+v", b)
	}
	if p := got["github.com/stickylb/stickylb/dataplane/proxy.BenchmarkLookup"]; p.nsPerOp != 99 {
		t.Errorf("a benchmark of another package must stay apart: %+v", p)
	}
}

func TestVerdicts(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	res := &results{
		Rows: []row{
			{Key: "upload", Unit: "Gbit/s", Better: higher},
			{Key: "download", Unit: "Gbit/s", Better: higher},
			{Key: "conn_rate", Unit: "conn/s", Better: higher},
			{Key: "latency_p99", Unit: "µs", Better: lower},
			{Key: "idle_rss", Unit: "KiB/conn", Better: lower},
			{Key: "idle_fds", Unit: "fds/conn", Better: lower, Prec: 2},
		},
		Cells: map[string]map[string]cell{
			"upload":      {targetStickylb: ok(12), targetHAProxy: ok(10)}, // 1.2×: pass
			"download":    {targetStickylb: ok(11), targetHAProxy: ok(10)}, // 1.1×: fail
			"conn_rate":   {targetStickylb: ok(100), targetHAProxy: {State: stateUnavailable}},
			"latency_p99": {targetStickylb: {State: stateFailed}, targetHAProxy: ok(50)},
			"idle_rss":    {targetStickylb: ok(9.5)},
			"idle_fds":    {targetStickylb: ok(2.012)},
		},
	}
	micro := parseBench(strings.NewReader(sampleBench))
	want := []string{"PASS", "FAIL", "SKIP", "FAIL", "PASS", "FAIL", "PASS", "PASS"}
	got := verdicts(res, micro)
	if len(got) != len(want) {
		t.Fatalf("got %d verdicts, want %d", len(got), len(want))
	}
	for i, v := range got {
		if v.result != want[i] {
			t.Errorf("%s: %s (%s), want %s", v.target, v.result, v.detail, want[i])
		}
	}
}

func TestSourcePool(t *testing.T) {
	p := sourcePool{third: 4, size: 2 * 254}
	for i, want := range map[int]string{0: "127.0.4.1", 253: "127.0.4.254", 254: "127.0.5.1", 507: "127.0.5.254", 508: "127.0.4.1"} {
		if got := p.addr(i); got != netip.MustParseAddr(want) {
			t.Errorf("addr(%d) = %s, want %s", i, got, want)
		}
	}
}
