package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Which way a row improves; ratios are printed for higher and lower alike.
const (
	neither = 0
	higher  = 1
	lower   = -1
)

// A row is one line of the table.
type row struct {
	Key    string `json:"key"`
	Label  string `json:"label"`
	Unit   string `json:"unit"`
	Better int    `json:"better"`
	Prec   int    `json:"prec"`
}

// Cell states.
const (
	stateOK          = "ok"
	stateNA          = "n/a"
	stateUnavailable = "unavailable"
	stateFailed      = "failed"
	stateNotMeasured = "not measured" // left out with -tests
)

type cell struct {
	State string  `json:"state"`
	Value float64 `json:"value,omitempty"`
}

// results is the table, written as JSON for -verdict.
type results struct {
	CPUs       int                        `json:"cpus"`
	GOMAXPROCS int                        `json:"gomaxprocs"`
	HAProxy    string                     `json:"haproxy,omitempty"`
	Nginx      string                     `json:"nginx,omitempty"`
	Targets    []string                   `json:"targets"`
	Rows       []row                      `json:"rows"`
	Cells      map[string]map[string]cell `json:"cells"` // row key → target → cell
}

func (res *results) get(key, target string) cell {
	c, ok := res.Cells[key][target]
	if !ok {
		return cell{State: stateNotMeasured}
	}
	return c
}

// record stores one measurement; over several rounds each row keeps its best
// value (failure counts add up).
func (res *results) record(m measurement, t *target, values []float64, err error) {
	for i, rw := range m.rows {
		old, seen := res.Cells[rw.Key][t.name]
		next := cell{State: stateOK}
		switch {
		case errors.Is(err, errNotApplicable):
			next.State = stateNA
		case errors.Is(err, errUnavailable):
			next.State = stateUnavailable
		case err != nil:
			next.State = stateFailed
		case math.IsNaN(values[i]): // a row the target has no value for
			next.State = stateNA
		default:
			next.Value = values[i]
		}
		if seen && old.State == stateOK {
			if next.State != stateOK {
				continue
			}
			switch rw.Better {
			case higher:
				next.Value = math.Max(old.Value, next.Value)
			case lower:
				next.Value = math.Min(old.Value, next.Value)
			default:
				next.Value += old.Value
			}
		}
		if res.Cells[rw.Key] == nil {
			res.Cells[rw.Key] = map[string]cell{}
		}
		res.Cells[rw.Key][t.name] = next
	}
}

func (res *results) write(path string) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func readResults(path string) (*results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var res results
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &res, nil
}

func formatValue(v float64, prec int) string {
	return strconv.FormatFloat(v, 'f', prec, 64)
}

func (res *results) format(rw row, target string) string {
	c := res.get(rw.Key, target)
	if c.State != stateOK {
		return c.State
	}
	return formatValue(c.Value, rw.Prec)
}

// ratio is a/b for rows with a direction, "n/a" when either is missing.
func (res *results) ratio(rw row, a, b string) string {
	ca, cb := res.get(rw.Key, a), res.get(rw.Key, b)
	if rw.Better == neither || ca.State != stateOK || cb.State != stateOK || cb.Value == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", ca.Value/cb.Value)
}

// printTable prints absolute values, then stickylb and HAProxy relative to
// direct, then stickylb relative to HAProxy. The rows stickylb-nopins was
// measured in follow in a table of their own: stickylb with pins (its
// default) and without, and their ratio. So do the rows the PROXY v2
// targets were measured in: stickylb without a header (None, its default),
// stickylb with V2 and HAProxy with send-proxy-v2, and the ratios of
// stickylb V2 to each of the others.
func printTable(w io.Writer, res *results) {
	header := []string{"metric", "unit", targetDirect, targetStickylb, targetHAProxy, "stickylb/direct", "haproxy/direct", "stickylb/haproxy"}
	lines := [][]string{header}
	for _, rw := range res.Rows {
		lines = append(lines, []string{
			rw.Label, rw.Unit,
			res.format(rw, targetDirect), res.format(rw, targetStickylb), res.format(rw, targetHAProxy),
			res.ratio(rw, targetStickylb, targetDirect), res.ratio(rw, targetHAProxy, targetDirect), res.ratio(rw, targetStickylb, targetHAProxy),
		})
	}
	printLines(w, lines)

	pinLines := [][]string{{"pins on vs off", "unit", "stickylb (pins on)", targetNoPins + " (off)", "on/off"}}
	for _, rw := range res.Rows {
		if !measuredIn(res, rw, targetNoPins) {
			continue
		}
		pinLines = append(pinLines, []string{
			rw.Label, rw.Unit, res.format(rw, targetStickylb), res.format(rw, targetNoPins), res.ratio(rw, targetStickylb, targetNoPins),
		})
	}
	if len(pinLines) > 1 {
		fmt.Fprintln(w)
		printLines(w, pinLines)
	}

	udpLines := [][]string{{"UDP vs nginx", "unit", targetDirect, targetStickylb, targetNginx, "stickylb/direct", "nginx/direct", "stickylb/nginx"}}
	for _, rw := range res.Rows {
		if !measuredIn(res, rw, targetNginx) {
			continue
		}
		udpLines = append(udpLines, []string{
			rw.Label, rw.Unit, res.format(rw, targetDirect), res.format(rw, targetStickylb), res.format(rw, targetNginx),
			res.ratio(rw, targetStickylb, targetDirect), res.ratio(rw, targetNginx, targetDirect), res.ratio(rw, targetStickylb, targetNginx),
		})
	}
	if len(udpLines) > 1 {
		fmt.Fprintln(w)
		printLines(w, udpLines)
	}

	v2Lines := [][]string{{"PROXY protocol v2", "unit", "stickylb (None)", targetV2, targetHAProxyV2 + " (send-proxy-v2)", "v2/None", "v2/haproxy-v2"}}
	for _, rw := range res.Rows {
		if !measuredIn(res, rw, targetV2) && !measuredIn(res, rw, targetHAProxyV2) {
			continue
		}
		v2Lines = append(v2Lines, []string{
			rw.Label, rw.Unit, res.format(rw, targetStickylb), res.format(rw, targetV2), res.format(rw, targetHAProxyV2),
			res.ratio(rw, targetV2, targetStickylb), res.ratio(rw, targetV2, targetHAProxyV2),
		})
	}
	if len(v2Lines) > 1 {
		fmt.Fprintln(w)
		printLines(w, v2Lines)
	}
}

// measuredIn is whether target took part in the row's test: measured,
// failed or unavailable, not n/a and not left out.
func measuredIn(res *results, rw row, target string) bool {
	st := res.get(rw.Key, target).State
	return st != stateNA && st != stateNotMeasured
}

// printLines prints a table: the first two columns are text, aligned left,
// the others numbers, aligned right.
func printLines(w io.Writer, lines [][]string) {
	widths := make([]int, len(lines[0]))
	for _, l := range lines {
		for i, f := range l {
			widths[i] = max(widths[i], utf8.RuneCountInString(f))
		}
	}
	for _, l := range lines {
		var b strings.Builder
		for i, f := range l {
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(f))
			if i < 2 { // text columns left, numbers right
				b.WriteString(f + pad + "  ")
			} else {
				b.WriteString(pad + f + "  ")
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
}

// benchResult is one line of `go test -bench -benchmem` output.
type benchResult struct {
	nsPerOp     float64
	allocsPerOp float64
	hasAllocs   bool
	// metrics are all the line's values by unit, "ns/op" and "allocs/op"
	// as well as those a benchmark reports itself (b.ReportMetric).
	metrics map[string]float64
}

// parseBench reads `go test -bench` output into results keyed by
// "import/path.BenchmarkName" (without the -GOMAXPROCS suffix).
func parseBench(r io.Reader) map[string]benchResult {
	out := map[string]benchResult{}
	pkg := ""
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if p, ok := strings.CutPrefix(line, "pkg: "); ok {
			pkg = strings.TrimSpace(p)
			continue
		}
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := f[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			if _, err := strconv.Atoi(name[i+1:]); err == nil {
				name = name[:i]
			}
		}
		br := benchResult{metrics: map[string]float64{}}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			br.metrics[f[i+1]] = v
			switch f[i+1] {
			case "ns/op":
				br.nsPerOp = v
			case "allocs/op":
				br.allocsPerOp, br.hasAllocs = v, true
			}
		}
		if br.nsPerOp > 0 {
			out[pkg+"."+name] = br
		}
	}
	return out
}

const (
	maglevPkg = "github.com/stickylb/stickylb/dataplane/maglev"
	pinsPkg   = "github.com/stickylb/stickylb/dataplane/pins"
)

// verdictLine is one of the targets, judged.
type verdictLine struct {
	result string // PASS, FAIL or SKIP
	target string
	detail string
}

// verdicts judges the targets from the table and the microbenchmarks.
func verdicts(res *results, micro map[string]benchResult) []verdictLine {
	var out []verdictLine
	rowOf := map[string]row{}
	for _, rw := range res.Rows {
		rowOf[rw.Key] = rw
	}
	// vsHAProxy compares stickylb with factor × HAProxy on one row.
	vsHAProxy := func(key, target string, factor float64) verdictLine {
		rw := rowOf[key]
		s, h := res.get(key, targetStickylb), res.get(key, targetHAProxy)
		v := verdictLine{target: target}
		switch {
		case s.State == stateFailed:
			v.result, v.detail = "FAIL", "the stickylb measurement failed (see the notes)"
		case s.State != stateOK:
			v.result, v.detail = "SKIP", "stickylb "+s.State
		case h.State != stateOK:
			v.result, v.detail = "SKIP", "haproxy "+h.State
		default:
			ok := s.Value <= factor*h.Value
			if rw.Better == higher {
				ok = s.Value >= factor*h.Value
			}
			v.result = passFail(ok)
			v.detail = fmt.Sprintf("stickylb %s vs haproxy %s %s", formatValue(s.Value, rw.Prec), formatValue(h.Value, rw.Prec), rw.Unit)
			if h.Value != 0 {
				v.detail += fmt.Sprintf(" (%.2f×)", s.Value/h.Value)
			}
		}
		return v
	}
	// atMost checks stickylb's own value on one row, as printed: a few fds
	// the proxy opens once (2.001 per connection) are not per connection.
	atMost := func(key, target string, limit float64) verdictLine {
		rw := rowOf[key]
		s := res.get(key, targetStickylb)
		switch s.State {
		case stateOK:
		case stateFailed:
			return verdictLine{"FAIL", target, "the stickylb measurement failed (see the notes)"}
		default:
			return verdictLine{"SKIP", target, "stickylb " + s.State}
		}
		shown := formatValue(s.Value, rw.Prec)
		v, _ := strconv.ParseFloat(shown, 64)
		return verdictLine{passFail(v <= limit), target, fmt.Sprintf("stickylb %s %s", shown, rw.Unit)}
	}
	out = append(out,
		vsHAProxy("upload", "bulk upload ≥ 1.2 × HAProxy", 1.2),
		vsHAProxy("download", "bulk download ≥ 1.2 × HAProxy", 1.2),
		vsHAProxy("conn_rate", "connection rate ≥ 1.0 × HAProxy", 1.0),
		vsHAProxy("latency_p99", "p99 latency ≤ HAProxy", 1.0),
		atMost("idle_rss", "≤ 10 KiB RSS per idle connection", 10),
		atMost("idle_fds", "≤ 2 fds per idle connection", 2),
	)

	lookup, ok := micro[maglevPkg+".BenchmarkLookup"]
	switch {
	case !ok:
		out = append(out, verdictLine{"SKIP", "Maglev lookup < 50 ns/op, 0 allocs/op", "no BenchmarkLookup result"})
	default:
		v := verdictLine{target: "Maglev lookup < 50 ns/op, 0 allocs/op", detail: fmt.Sprintf("%.2f ns/op, %g allocs/op", lookup.nsPerOp, lookup.allocsPerOp)}
		v.result = passFail(lookup.nsPerOp < 50 && lookup.hasAllocs && lookup.allocsPerOp == 0)
		if !lookup.hasAllocs {
			v.detail = fmt.Sprintf("%.2f ns/op, allocs not reported (run with -benchmem)", lookup.nsPerOp)
		}
		out = append(out, v)
	}
	if build, ok := micro[maglevPkg+".BenchmarkBuild1000"]; ok {
		out = append(out, verdictLine{passFail(build.nsPerOp < 20e6), "Maglev table build, 1000 backends < 20 ms", fmt.Sprintf("%.2f ms", build.nsPerOp/1e6)})
	} else {
		out = append(out, verdictLine{"SKIP", "Maglev table build, 1000 backends < 20 ms", "no BenchmarkBuild1000 result"})
	}
	out = append(out, pinsVsNoPins(res, rowOf["conn_rate"], 0.95))
	const pinMemory = "memory per pinned client < 100 B"
	if pm, ok := micro[pinsPkg+".BenchmarkPinMemory"].metrics["B/pin"]; ok {
		out = append(out, verdictLine{passFail(pm < 100), pinMemory, fmt.Sprintf("%.1f B/pin (Go heap, 1,000,000 pins in one table)", pm)})
	} else {
		out = append(out, verdictLine{"SKIP", pinMemory, "no BenchmarkPinMemory B/pin result"})
	}
	out = append(out, v2VsHAProxy(res, rowOf["conn_rate"]), v2VsNone(res, rowOf["conn_rate"], 0.95))
	out = append(out, udpVsNginx(res, rowOf["udp_rate"], 1.2))
	return out
}

// udpVsNginx compares stickylb's UDP echo rate on the workload
// (64 B, 32 sources, 8 in flight each) with nginx stream's, measured side
// by side in the same run; the detail adds the other UDP workloads' ratios.
func udpVsNginx(res *results, rw row, factor float64) verdictLine {
	v := verdictLine{target: fmt.Sprintf("UDP datagrams/s stickylb vs nginx ≥ %.1f×", factor)}
	s, n := res.get("udp_rate", targetStickylb), res.get("udp_rate", targetNginx)
	switch {
	case s.State == stateFailed:
		v.result, v.detail = "FAIL", "the stickylb measurement failed (see the notes)"
	case s.State != stateOK:
		v.result, v.detail = "SKIP", "stickylb "+s.State
	case n.State != stateOK:
		v.result, v.detail = "SKIP", "nginx "+n.State
	case n.Value == 0:
		v.result, v.detail = "SKIP", "nginx echoed nothing"
	default:
		v.result = passFail(s.Value >= factor*n.Value)
		v.detail = fmt.Sprintf("stickylb %s vs nginx %s %s (%.2f×)", formatValue(s.Value, rw.Prec), formatValue(n.Value, rw.Prec), rw.Unit, s.Value/n.Value)
		if sc, nc := res.get("udp_cpu", targetStickylb), res.get("udp_cpu", targetNginx); sc.State == stateOK && nc.State == stateOK {
			v.detail += fmt.Sprintf("; CPU per echo %.2f vs %.2f µs", sc.Value, nc.Value)
		}
		for _, o := range []struct{ key, name string }{{"udp_rate_1000", "1,000 sources"}, {"udp_rate_1400", "1,400 B"}} {
			so, no := res.get(o.key, targetStickylb), res.get(o.key, targetNginx)
			if so.State == stateOK && no.State == stateOK && no.Value > 0 {
				v.detail += fmt.Sprintf("; %s %.2f×", o.name, so.Value/no.Value)
			}
		}
	}
	return v
}

// pinsVsNoPins compares the short-connection rate of stickylb with pins (its
// default) with that of the same binary with sessionPersistenceTimeoutInMinutes:
// 0, measured back to back in the same run: pins on must reach factor × off.
func pinsVsNoPins(res *results, rw row, factor float64) verdictLine {
	return rateVerdict(res, rw, fmt.Sprintf("pins on vs off, short connections ≥ %.2f×", factor),
		side{targetStickylb, "on"}, side{targetNoPins, "off"}, factor)
}

// v2VsHAProxy compares the short-connection rate of stickylb with
// proxyProtocol: V2 with that of HAProxy with send-proxy-v2, over the same
// header-parsing backends in the same run: stickylb must reach HAProxy's.
func v2VsHAProxy(res *results, rw row) verdictLine {
	return rateVerdict(res, rw, "PROXY v2: stickylb ≥ HAProxy send-proxy-v2, short connections",
		side{targetV2, "stickylb V2"}, side{targetHAProxyV2, "haproxy send-proxy-v2"}, 1)
}

// v2VsNone compares the short-connection rate of stickylb with
// proxyProtocol: V2 with that of the default rule (None), measured back to
// back in the same run: V2 must reach factor × None.
func v2VsNone(res *results, rw row, factor float64) verdictLine {
	return rateVerdict(res, rw, fmt.Sprintf("PROXY v2 vs None, short connections ≥ %.2f×", factor),
		side{targetV2, "V2"}, side{targetStickylb, "None"}, factor)
}

// A side is one of the two targets a verdict compares, and how its detail
// names it.
type side struct{ target, label string }

// rateVerdict judges a's short-connection rate against factor × b's, both
// measured in the same run; the detail shows both rates, their ratio, and
// the failed connections of either if any.
func rateVerdict(res *results, rw row, title string, a, b side, factor float64) verdictLine {
	v := verdictLine{target: title}
	ca, cb := res.get("conn_rate", a.target), res.get("conn_rate", b.target)
	switch {
	case ca.State == stateFailed:
		v.result, v.detail = "FAIL", "the "+a.target+" measurement failed (see the notes)"
	case cb.State == stateFailed:
		v.result, v.detail = "FAIL", "the "+b.target+" measurement failed (see the notes)"
	case ca.State != stateOK:
		v.result, v.detail = "SKIP", a.target+" "+ca.State
	case cb.State != stateOK:
		v.result, v.detail = "SKIP", b.target+" "+cb.State
	case cb.Value == 0:
		v.result, v.detail = "FAIL", b.target+" made no connection"
	default:
		v.result = passFail(ca.Value >= factor*cb.Value)
		v.detail = fmt.Sprintf("%s %s vs %s %s %s (%.2f×)", a.label, formatValue(ca.Value, rw.Prec), b.label, formatValue(cb.Value, rw.Prec), rw.Unit, ca.Value/cb.Value)
		failedA, failedB := res.get("conn_errors", a.target), res.get("conn_errors", b.target)
		if failedA.Value > 0 || failedB.Value > 0 {
			v.detail += fmt.Sprintf("; failed connections: %s %g, %s %g", a.label, failedA.Value, b.label, failedB.Value)
		}
	}
	return v
}

func passFail(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// printVerdict prints the verdicts; a missing or unreadable input is an
// error of the harness, not a verdict.
func printVerdict(w io.Writer, jsonPath, microPath string) int {
	if jsonPath == "" {
		fmt.Fprintln(os.Stderr, "bench: -verdict needs -json")
		return 2
	}
	res, err := readResults(jsonPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	micro := map[string]benchResult{}
	if microPath != "" {
		f, err := os.Open(microPath)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
		micro = parseBench(f)
		f.Close()
	}
	vs := verdicts(res, micro)
	width := 0
	for _, v := range vs {
		width = max(width, utf8.RuneCountInString(v.target))
	}
	for _, v := range vs {
		pad := strings.Repeat(" ", width-utf8.RuneCountInString(v.target))
		fmt.Fprintf(w, "%s  %s%s  %s\n", v.result, v.target, pad, v.detail)
	}
	return 0
}
