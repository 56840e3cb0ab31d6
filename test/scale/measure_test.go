package scale

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// sample is what the benchmark reads of the stickylb process at one time.
type sample struct {
	rss, hwm uint64 // /proc/PID/status VmRSS, VmHWM
	heap     uint64 // go_memstats_heap_inuse_bytes
	live     uint64 // the same right after a GC
	series   int    // samples in one scrape of /metrics
	// ruleSeries counts, by metric name, the series with a rule label.
	ruleSeries  map[string]int
	scrapeBytes int
	fds         int // open file descriptors
	sockets     int // of which sockets
}

// measure reads /proc first, then scrapes /metrics (which allocates).
func (p *process) measure(b *testing.B) sample {
	pid := p.cmd.Process.Pid
	var s sample
	s.rss, s.hwm = procStatus(pid, "VmRSS"), procStatus(pid, "VmHWM")
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		b.Fatal(err)
	}
	s.fds = len(entries)
	for _, e := range entries {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); err == nil && strings.HasPrefix(l, "socket:") {
			s.sockets++
		}
	}
	resp, err := p.http.Get("http://" + p.metrics + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		b.Fatal(err)
	}
	s.scrapeBytes = len(raw)
	s.ruleSeries = map[string]int{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		s.series++
		metric, labels, _ := strings.Cut(line, "{")
		if strings.HasPrefix(line, "go_memstats_heap_inuse_bytes ") {
			v, err := strconv.ParseFloat(strings.Fields(line)[1], 64)
			if err == nil {
				s.heap = uint64(v)
			}
		}
		if strings.Contains(labels, `rule="`) {
			s.ruleSeries[metric]++
		}
	}
	if s.heap == 0 {
		b.Fatal("no go_memstats_heap_inuse_bytes in stickylb's /metrics")
	}
	return s
}

func (s sample) byFamily() string {
	var names []string
	for n := range s.ruleSeries {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []string
	for _, n := range names {
		out = append(out, fmt.Sprintf("%s %d", n, s.ruleSeries[n]))
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

// procStatus reads a field of /proc/PID/status, in bytes.
func procStatus(pid int, field string) uint64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), field+":")
		if !ok {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return 0
		}
		return kb << 10
	}
	return 0
}
