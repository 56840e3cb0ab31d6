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
PASS
pkg: github.com/stickylb/stickylb/dataplane/pins
BenchmarkPinMemory-2           	       4	 290411650 ns/op	        61.37 B/pin	64391604 B/op	    1066 allocs/op
BenchmarkLookup-2              	250061924	         4.797 ns/op	       0 B/op	       0 allocs/op
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
	pm := got[pinsPkg+".BenchmarkPinMemory"]
	if pm.metrics["B/pin"] != 61.37 || pm.metrics["B/op"] != 64391604 || pm.nsPerOp != 290411650 || pm.allocsPerOp != 1066 {
		t.Errorf("BenchmarkPinMemory = %+v", pm)
	}
	if _, ok := got[pinsPkg+".BenchmarkLookup"].metrics["B/pin"]; ok {
		t.Errorf("pins BenchmarkLookup has a B/pin metric: %+v", got[pinsPkg+".BenchmarkLookup"])
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
			"upload":   {targetStickylb: ok(12), targetHAProxy: ok(10)}, // 1.2×: pass
			"download": {targetStickylb: ok(11), targetHAProxy: ok(10)}, // 1.1×: fail
			// vs HAProxy: skip; pins on vs off, 0.96×: pass
			"conn_rate":   {targetStickylb: ok(100), targetNoPins: ok(104), targetHAProxy: {State: stateUnavailable}},
			"latency_p99": {targetStickylb: {State: stateFailed}, targetHAProxy: ok(50)},
			"idle_rss":    {targetStickylb: ok(9.5)},
			"idle_fds":    {targetStickylb: ok(2.012)},
		},
	}
	micro := parseBench(strings.NewReader(sampleBench))
	want := []string{"PASS", "FAIL", "SKIP", "FAIL", "PASS", "FAIL", "PASS", "PASS", "PASS", "PASS"}
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

func TestPinVerdicts(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	rows := []row{{Key: "conn_rate", Unit: "conn/s", Better: higher}, {Key: "conn_errors", Unit: "count"}}
	benchPinMemory := func(bPerPin string) map[string]benchResult {
		return parseBench(strings.NewReader("pkg: " + pinsPkg + "\nBenchmarkPinMemory-2 1 290411650 ns/op " + bPerPin + " B/pin 64391604 B/op 1066 allocs/op\n"))
	}
	for _, tc := range []struct {
		name             string
		on, off          cell
		errs             map[string]cell
		micro            map[string]benchResult
		pins, mem        string // want
		pinsDetail, mDet string // want in the details
	}{
		{name: "pass", on: ok(9600), off: ok(10000), micro: benchPinMemory("61.4"),
			pins: "PASS", mem: "PASS", pinsDetail: "on 9600 vs off 10000 conn/s (0.96×)", mDet: "61.4 B/pin"},
		{name: "pins slower", on: ok(9400), off: ok(10000), micro: benchPinMemory("100"),
			pins: "FAIL", mem: "FAIL", pinsDetail: "(0.94×)", mDet: "100.0 B/pin"},
		{name: "failed connections shown", on: ok(10000), off: ok(10000),
			errs: map[string]cell{targetStickylb: ok(3), targetNoPins: ok(0)},
			pins: "PASS", mem: "SKIP", pinsDetail: "failed connections: on 3, off 0", mDet: "no BenchmarkPinMemory"},
		{name: "no nopins column (older results)", on: ok(10000), off: cell{},
			pins: "SKIP", mem: "SKIP", pinsDetail: "stickylb-nopins not measured"},
		{name: "nopins unavailable", on: ok(10000), off: cell{State: stateUnavailable},
			pins: "SKIP", mem: "SKIP", pinsDetail: "stickylb-nopins unavailable"},
		{name: "stickylb failed", on: cell{State: stateFailed}, off: ok(10000),
			pins: "FAIL", mem: "SKIP", pinsDetail: "the stickylb measurement failed"},
		{name: "nopins failed", on: ok(10000), off: cell{State: stateFailed},
			pins: "FAIL", mem: "SKIP", pinsDetail: "the stickylb-nopins measurement failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rate := map[string]cell{targetStickylb: tc.on}
			if tc.off.State != "" {
				rate[targetNoPins] = tc.off
			}
			res := &results{Rows: rows, Cells: map[string]map[string]cell{"conn_rate": rate, "conn_errors": tc.errs}}
			vs := verdicts(res, tc.micro)
			pins, mem := vs[len(vs)-2], vs[len(vs)-1]
			if pins.target != "pins on vs off, short connections ≥ 0.95×" || mem.target != "memory per pinned client < 100 B" {
				t.Fatalf("the last verdicts are %q and %q", pins.target, mem.target)
			}
			if pins.result != tc.pins || !strings.Contains(pins.detail, tc.pinsDetail) {
				t.Errorf("pins on vs off: %s (%s), want %s (%s)", pins.result, pins.detail, tc.pins, tc.pinsDetail)
			}
			if mem.result != tc.mem || !strings.Contains(mem.detail, tc.mDet) {
				t.Errorf("memory per pin: %s (%s), want %s (%s)", mem.result, mem.detail, tc.mem, tc.mDet)
			}
		})
	}
}

func TestPinsTable(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	res := &results{
		Rows: []row{
			{Key: "upload", Label: "bulk upload", Unit: "Gbit/s", Better: higher, Prec: 2},
			{Key: "conn_rate", Label: "short connections", Unit: "conn/s", Better: higher},
			{Key: "conn_errors", Label: "  failed connections", Unit: "count"},
		},
		Cells: map[string]map[string]cell{
			"upload":      {targetStickylb: ok(10), targetNoPins: {State: stateNA}},
			"conn_rate":   {targetStickylb: ok(9900), targetNoPins: ok(10000)},
			"conn_errors": {targetStickylb: ok(0), targetNoPins: ok(0)},
		},
	}
	var b strings.Builder
	printTable(&b, res)
	_, pinsTable, found := strings.Cut(b.String(), "\n\n")
	if !found {
		t.Fatalf("no pins table:\n%s", b.String())
	}
	want := `pins on vs off        unit    stickylb (pins on)  stickylb-nopins (off)  on/off
short connections     conn/s                9900                  10000    0.99
  failed connections  count                    0                      0     n/a
`
	if pinsTable != want {
		t.Errorf("pins table:\n%s\nwant:\n%s", pinsTable, want)
	}

	delete(res.Cells["conn_rate"], targetNoPins)
	delete(res.Cells["conn_errors"], targetNoPins)
	b.Reset()
	printTable(&b, res)
	if strings.Contains(b.String(), "pins on vs off") {
		t.Errorf("a pins table without stickylb-nopins results:\n%s", b.String())
	}
}

func TestSourcePool(t *testing.T) {
	p := sourcePool{third: 4, size: 2 * 254}
	for i, want := range map[int]string{0: "127.0.4.1", 253: "127.0.4.254", 254: "127.0.5.1", 507: "127.0.5.254", 508: "127.0.4.1"} {
		if got := p.addr(i); got != netip.MustParseAddr(want) {
			t.Errorf("addr(%d) = %s, want %s", i, got, want)
		}
	}
	for i, want := range map[int]string{0: "127.16.0.1", 254: "127.16.1.1", 256 * 254: "127.17.0.1", connSources.size - 1: "127.31.255.254", connSources.size: "127.16.0.1"} {
		if got := connSources.addr(i); got != netip.MustParseAddr(want) {
			t.Errorf("connSources.addr(%d) = %s, want %s", i, got, want)
		}
	}
}

// The short-connections test: each client connects connReuse times,
// connSpacing connections apart, and connClients counts them.
func TestConnClients(t *testing.T) {
	uses := map[int][]int{} // client → its connections
	const n = 3*connReuse*connSpacing + connSpacing/2
	for i := range n {
		c := connClient(i)
		uses[c] = append(uses[c], i)
		if got := connClients(i + 1); got != len(uses) {
			t.Fatalf("connClients(%d) = %d, want %d", i+1, got, len(uses))
		}
	}
	for c, is := range uses {
		full := c < 3*connSpacing
		if full && len(is) != connReuse || !full && len(is) != 1 {
			t.Errorf("client %d made connections %v", c, is)
		}
		for k := 1; k < len(is); k++ {
			if is[k]-is[k-1] != connSpacing {
				t.Errorf("client %d made connections %v, not %d apart", c, is, connSpacing)
			}
		}
	}
}
