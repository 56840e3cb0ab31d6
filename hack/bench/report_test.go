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
			// vs HAProxy: skip; pins on vs off, 0.96×: pass; PROXY v2 vs
			// HAProxy send-proxy-v2, 0.99×: fail; v2 vs None, 0.95×: pass
			"conn_rate": {
				targetStickylb: ok(100), targetNoPins: ok(104), targetHAProxy: {State: stateUnavailable},
				targetV2: ok(95), targetHAProxyV2: ok(96),
			},
			"latency_p99": {targetStickylb: {State: stateFailed}, targetHAProxy: ok(50)},
			"idle_rss":    {targetStickylb: ok(9.5)},
			"idle_fds":    {targetStickylb: ok(2.012)},
		},
	}
	micro := parseBench(strings.NewReader(sampleBench))
	want := []string{"PASS", "FAIL", "SKIP", "FAIL", "PASS", "FAIL", "PASS", "PASS", "PASS", "PASS", "FAIL", "PASS", "SKIP"}
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
			pins := verdictNamed(t, vs, "pins on vs off, short connections ≥ 0.95×")
			mem := verdictNamed(t, vs, "memory per pinned client < 100 B")
			if pins.result != tc.pins || !strings.Contains(pins.detail, tc.pinsDetail) {
				t.Errorf("pins on vs off: %s (%s), want %s (%s)", pins.result, pins.detail, tc.pins, tc.pinsDetail)
			}
			if mem.result != tc.mem || !strings.Contains(mem.detail, tc.mDet) {
				t.Errorf("memory per pin: %s (%s), want %s (%s)", mem.result, mem.detail, tc.mem, tc.mDet)
			}
		})
	}
}

func TestUDPVerdict(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	rows := []row{{Key: "udp_rate", Unit: "datagrams/s", Better: higher}}
	const title = "UDP datagrams/s stickylb vs nginx ≥ 1.2×"
	for _, tc := range []struct {
		name           string
		cells          map[string]map[string]cell
		result, detail string
	}{
		{name: "1.2× passes", cells: map[string]map[string]cell{
			"udp_rate":      {targetStickylb: ok(60000), targetNginx: ok(50000)},
			"udp_rate_1000": {targetStickylb: ok(30000), targetNginx: ok(40000)},
			"udp_rate_1400": {targetStickylb: ok(50000), targetNginx: ok(40000)},
		}, result: "PASS", detail: "stickylb 60000 vs nginx 50000 datagrams/s (1.20×); 1,000 sources 0.75×; 1,400 B 1.25×"},
		{name: "below fails", cells: map[string]map[string]cell{"udp_rate": {targetStickylb: ok(59000), targetNginx: ok(50000)}},
			result: "FAIL", detail: "(1.18×)"},
		{name: "no nginx", cells: map[string]map[string]cell{"udp_rate": {targetStickylb: ok(59000), targetNginx: {State: stateUnavailable}}},
			result: "SKIP", detail: "nginx unavailable"},
		{name: "stickylb failed", cells: map[string]map[string]cell{"udp_rate": {targetStickylb: {State: stateFailed}, targetNginx: ok(1)}},
			result: "FAIL", detail: "measurement failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := verdictNamed(t, verdicts(&results{Rows: rows, Cells: tc.cells}, nil), title)
			if v.result != tc.result || !strings.Contains(v.detail, tc.detail) {
				t.Errorf("%s (%s), want %s (%s)", v.result, v.detail, tc.result, tc.detail)
			}
		})
	}
}

// verdictNamed is the verdict of that title; the test fails without one.
func verdictNamed(t *testing.T, vs []verdictLine, title string) verdictLine {
	t.Helper()
	for _, v := range vs {
		if v.target == title {
			return v
		}
	}
	t.Fatalf("no verdict %q", title)
	return verdictLine{}
}

func TestV2Verdicts(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	rows := []row{{Key: "conn_rate", Unit: "conn/s", Better: higher}, {Key: "conn_errors", Unit: "count"}}
	const (
		vsHAProxyTitle = "PROXY v2: stickylb ≥ HAProxy send-proxy-v2, short connections"
		vsNoneTitle    = "PROXY v2 vs None, short connections ≥ 0.95×"
	)
	for _, tc := range []struct {
		name                 string
		rate, errs           map[string]cell // target → cell; absent: not measured
		vsHAProxy, vsNone    string          // want
		haDetail, noneDetail string          // want in the details
	}{
		{name: "pass",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9600), targetHAProxyV2: ok(9000)},
			vsHAProxy: "PASS", haDetail: "stickylb V2 9600 vs haproxy send-proxy-v2 9000 conn/s (1.07×)",
			vsNone: "PASS", noneDetail: "V2 9600 vs None 10000 conn/s (0.96×)"},
		{name: "equal to HAProxy passes, exactly 0.95× passes",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9500), targetHAProxyV2: ok(9500)},
			vsHAProxy: "PASS", haDetail: "(1.00×)", vsNone: "PASS", noneDetail: "(0.95×)"},
		{name: "below HAProxy, below 0.95× of None",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9400), targetHAProxyV2: ok(9401)},
			vsHAProxy: "FAIL", haDetail: "stickylb V2 9400 vs haproxy send-proxy-v2 9401", vsNone: "FAIL", noneDetail: "(0.94×)"},
		{name: "failed connections shown",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(10000), targetHAProxyV2: ok(9000)},
			errs:      map[string]cell{targetStickylb: ok(0), targetV2: ok(2), targetHAProxyV2: ok(5)},
			vsHAProxy: "PASS", haDetail: "failed connections: stickylb V2 2, haproxy send-proxy-v2 5",
			vsNone: "PASS", noneDetail: "failed connections: V2 2, None 0"},
		// A target that sends no header: every connection refused by the
		// backends, so none counted, all failed.
		{name: "a target that sends no header",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(0), targetHAProxyV2: ok(9000)},
			errs:      map[string]cell{targetV2: ok(1400)},
			vsHAProxy: "FAIL", haDetail: "(0.00×); failed connections: stickylb V2 1400",
			vsNone: "FAIL", noneDetail: "V2 0 vs None 10000"},
		{name: "haproxy-v2 made no connection",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9600), targetHAProxyV2: ok(0)},
			vsHAProxy: "FAIL", haDetail: "haproxy-v2 made no connection", vsNone: "PASS"},
		{name: "no v2 columns (older results)",
			rate:      map[string]cell{targetStickylb: ok(10000), targetHAProxy: ok(9000)},
			vsHAProxy: "SKIP", haDetail: "stickylb-v2 not measured", vsNone: "SKIP", noneDetail: "stickylb-v2 not measured"},
		{name: "haproxy unavailable",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9600), targetHAProxyV2: {State: stateUnavailable}},
			vsHAProxy: "SKIP", haDetail: "haproxy-v2 unavailable", vsNone: "PASS"},
		{name: "stickylb-v2 failed",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: {State: stateFailed}, targetHAProxyV2: ok(9000)},
			vsHAProxy: "FAIL", haDetail: "the stickylb-v2 measurement failed", vsNone: "FAIL", noneDetail: "the stickylb-v2 measurement failed"},
		{name: "stickylb (None) failed",
			rate:      map[string]cell{targetStickylb: {State: stateFailed}, targetV2: ok(9600), targetHAProxyV2: ok(9000)},
			vsHAProxy: "PASS", vsNone: "FAIL", noneDetail: "the stickylb measurement failed"},
		{name: "haproxy-v2 failed",
			rate:      map[string]cell{targetStickylb: ok(10000), targetV2: ok(9600), targetHAProxyV2: {State: stateFailed}},
			vsHAProxy: "FAIL", haDetail: "the haproxy-v2 measurement failed", vsNone: "PASS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := &results{Rows: rows, Cells: map[string]map[string]cell{"conn_rate": tc.rate, "conn_errors": tc.errs}}
			vs := verdicts(res, nil)
			ha, none := verdictNamed(t, vs, vsHAProxyTitle), verdictNamed(t, vs, vsNoneTitle)
			if ha.result != tc.vsHAProxy || !strings.Contains(ha.detail, tc.haDetail) {
				t.Errorf("vs HAProxy: %s (%s), want %s (%s)", ha.result, ha.detail, tc.vsHAProxy, tc.haDetail)
			}
			if none.result != tc.vsNone || !strings.Contains(none.detail, tc.noneDetail) {
				t.Errorf("vs None: %s (%s), want %s (%s)", none.result, none.detail, tc.vsNone, tc.noneDetail)
			}
		})
	}
}

func TestV2Table(t *testing.T) {
	ok := func(v float64) cell { return cell{State: stateOK, Value: v} }
	res := &results{
		Rows: []row{
			{Key: "upload", Label: "bulk upload", Unit: "Gbit/s", Better: higher, Prec: 2},
			{Key: "conn_rate", Label: "short connections", Unit: "conn/s", Better: higher},
			{Key: "conn_errors", Label: "  failed connections", Unit: "count"},
		},
		Cells: map[string]map[string]cell{
			"upload":      {targetStickylb: ok(10), targetV2: {State: stateNA}, targetHAProxyV2: {State: stateNA}},
			"conn_rate":   {targetStickylb: ok(10000), targetV2: ok(9700), targetHAProxyV2: ok(8000)},
			"conn_errors": {targetStickylb: ok(0), targetV2: ok(0), targetHAProxyV2: ok(1)},
		},
	}
	var b strings.Builder
	printTable(&b, res)
	_, v2Table, found := strings.Cut(b.String(), "\n\n")
	if !found {
		t.Fatalf("no PROXY v2 table:\n%s", b.String())
	}
	want := `PROXY protocol v2     unit    stickylb (None)  stickylb-v2  haproxy-v2 (send-proxy-v2)  v2/None  v2/haproxy-v2
short connections     conn/s            10000         9700                        8000     0.97           1.21
  failed connections  count                 0            0                           1      n/a            n/a
`
	if v2Table != want {
		t.Errorf("PROXY v2 table:\n%s\nwant:\n%s", v2Table, want)
	}

	// HAProxy missing: the table stays, its column says why.
	res.Cells["conn_rate"][targetHAProxyV2] = cell{State: stateUnavailable}
	b.Reset()
	printTable(&b, res)
	if !strings.Contains(b.String(), "short connections     conn/s            10000         9700                 unavailable     0.97            n/a") {
		t.Errorf("PROXY v2 table without HAProxy:\n%s", b.String())
	}

	for _, target := range []string{targetV2, targetHAProxyV2} {
		delete(res.Cells["conn_rate"], target)
		delete(res.Cells["conn_errors"], target)
	}
	b.Reset()
	printTable(&b, res)
	if strings.Contains(b.String(), "PROXY protocol v2") {
		t.Errorf("a PROXY v2 table without v2 results:\n%s", b.String())
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
