// Command bench is the dataplane benchmark behind `make bench` (hack/bench.sh).
//
// In one run it measures three main ways of reaching the same four backends
// (127.0.1.1-4, served by a child process of this driver so that backends and
// load generator do not share a Go scheduler): directly, through
// `stickylb proxy`, and through HAProxy (mode tcp, balance source, consistent
// hashing). For each target, one after another, it measures bulk throughput
// in each direction, short connections per second from many client IPs,
// ping-pong latency over one connection, RSS and file descriptors per idle
// proxied connection, and UDP echo datagrams per second.
//
// The stickylb target's rule leaves sessionPersistenceTimeoutInMinutes
// unset: ClientIP clients are pinned to their backend (issue 13), as users
// get by default. A fourth target, stickylb-nopins, is the same binary with
// the rule's sessionPersistenceTimeoutInMinutes: 0 (no pins, Maglev only);
// it runs in the short-connections test only, right before or after
// stickylb, and its column is printed in a table of its own, pins on vs off.
// In that test the clients are many (about a quarter as many as the
// connections, from 127.16.0.1 up) and each connects 4 times, so that the
// pin table both grows and is read while the clock runs.
//
// Two more targets measure the PROXY protocol (issue 15) in the same test
// only: stickylb-v2, the same binary with the rule's proxyProtocol: V2, and
// haproxy-v2, HAProxy with send-proxy-v2 on its servers. They reach the
// same four backend addresses on a second port, where each connection must
// open with a PROXY v2 header, parsed and consumed with
// github.com/pires/go-proxyproto before the service byte; a connection
// without one is refused (the backend answers '!' and the reason, then
// closes), so a target that does not send it shows failed connections and
// no rate. Every round runs stickylb-nopins, stickylb (None), stickylb-v2,
// haproxy-v2, haproxy in a row, in one order or the other, and a third
// table prints stickylb None, stickylb V2 and HAProxy send-proxy-v2 with
// the ratios V2/None and V2/HAProxy-v2.
//
// The build machines are shared and noisy: absolute numbers move from run to
// run, so the table also prints ratios between targets measured back to back
// in the same run, and the targets are judged on those ratios.
//
//	bench [-stickylb bin/stickylb] [-haproxy haproxy] [-json results.json]
//	bench -verdict -json results.json -microbench gotest-bench.txt
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

type config struct {
	stickylb  string        // path of the stickylb binary; "" leaves its column out
	extraArgs string        // more flags for `stickylb proxy`, space-separated
	haproxy   string        // path of haproxy; "" leaves its column out
	nginx     string        // path of nginx, the UDP peer; "" leaves its column out
	window    time.Duration // measured part of each throughput and rate test
	warmup    time.Duration // unmeasured run-in before each window
	rounds    int           // repeat every test; the best round counts
	idleConns int
	pingPongs int
	jsonOut   string
	tests     string // comma-separated measurement names; "" for all
}

func main() {
	var cfg config
	serveBackendsMode := flag.Bool("serve-backends", false, "internal: serve the benchmark backends (the driver starts itself this way)")
	verdictMode := flag.Bool("verdict", false, "print the issue's targets as PASS/FAIL/SKIP from -json and -microbench, then exit")
	microbench := flag.String("microbench", "", "with -verdict: a file holding `go test -bench -benchmem ./dataplane/...` output")
	flag.StringVar(&cfg.stickylb, "stickylb", "bin/stickylb", "stickylb binary to benchmark (\"\" to skip)")
	flag.StringVar(&cfg.extraArgs, "stickylb-args", "", "more flags for `stickylb proxy`, space-separated (e.g. --backend-congestion-control=system)")
	flag.StringVar(&cfg.haproxy, "haproxy", "haproxy", "haproxy binary to compare with (\"\" to skip)")
	flag.StringVar(&cfg.nginx, "nginx", "nginx", "nginx binary (with the stream module) to compare with in the UDP tests (\"\" to skip)")
	flag.DurationVar(&cfg.window, "window", 4*time.Second, "measured duration of each throughput and rate test")
	flag.DurationVar(&cfg.warmup, "warmup", 500*time.Millisecond, "unmeasured warm-up before each window")
	flag.IntVar(&cfg.rounds, "rounds", 2, "run every test this many times (alternating the order of the targets) and keep each target's best result")
	flag.IntVar(&cfg.idleConns, "idle-conns", 8000, "idle proxied connections held open for the memory test")
	flag.IntVar(&cfg.pingPongs, "ping-pongs", 20000, "measured round trips of the latency test")
	flag.StringVar(&cfg.jsonOut, "json", "", "write the results here (read back by -verdict)")
	flag.StringVar(&cfg.tests, "tests", "", "run only these tests, comma-separated: upload,download,connections,latency,idle,udp,udp1000,udp1400")
	flag.Parse()

	switch {
	case *serveBackendsMode:
		os.Exit(serveBackends())
	case *verdictMode:
		os.Exit(printVerdict(os.Stdout, cfg.jsonOut, *microbench))
	}
	if cfg.window <= 0 || cfg.warmup < 0 || cfg.rounds < 1 || cfg.idleConns < 1 || cfg.pingPongs < 100 {
		fmt.Fprintln(os.Stderr, "bench: -window must be positive, -rounds and -idle-conns at least 1, -ping-pongs at least 100")
		os.Exit(2)
	}
	os.Exit(run(cfg))
}

// run measures every target and prints the table. It returns non-zero when
// the harness itself failed: its backends, its files, or the direct target
// (which involves nothing but the harness). A proxy that fails is a result.
func run(cfg config) int {
	tmp, err := os.MkdirTemp("", "stickylb-bench-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	stopOnSignal(tmp)
	defer killChildren()

	r := &runner{config: cfg, tmp: tmp}
	nofile, err := raiseNoFile()
	if err != nil {
		r.note("RLIMIT_NOFILE: %v", err)
	}
	// The proxy holds two sockets per idle connection, plus a few of its own.
	if limit := (int(nofile) - 256) / 2; r.idleConns > limit {
		r.note("RLIMIT_NOFILE is %d: the idle test opens %d connections instead of %d", nofile, limit, r.idleConns)
		r.idleConns = limit
	}
	ms, err := r.selected()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 2
	}

	res := &results{
		CPUs:       runtime.NumCPU(),
		GOMAXPROCS: runtime.GOMAXPROCS(0),
		Targets:    []string{targetDirect, targetStickylb, targetNoPins, targetV2, targetHAProxyV2, targetHAProxy, targetNginx},
		Cells:      map[string]map[string]cell{},
	}
	// Side by side, each round in this order or the reverse: stickylb
	// without pins, with (the default), with proxyProtocol: V2, then
	// HAProxy with send-proxy-v2 and without. So stickylb runs next to
	// both its variants, and the two v2 targets next to each other.
	// nginx, in the UDP tests only, runs right after stickylb (or before).
	haproxy, nginx := r.haproxyTarget(), r.nginxTarget()
	targets := []*target{
		{name: targetDirect}, r.noPinsTarget(), r.stickylbTarget(), nginx, r.v2Target(), r.haproxyV2Target(), haproxy,
	}
	if haproxy.unavailable == "" {
		res.HAProxy = haproxyVersion(haproxy.bin)
	}
	if nginx.unavailable == "" {
		res.Nginx = nginxVersion(nginx.bin)
	}
	printHeader(os.Stdout, r, res)

	backends, port, v2Port, err := startBackends()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	defer backends.stop()
	r.backendPort, r.v2BackendPort = port, v2Port
	if slices.ContainsFunc(ms, func(m measurement) bool { return m.name == v2Test }) {
		r.note("%s and %s reach the backends on port %d, where each connection must open with a PROXY protocol v2 header "+
			"(go-proxyproto, REQUIRE; without one the backend refuses it, a failed connection); the other targets port %d, without",
			targetV2, targetHAProxyV2, v2Port, port)
	}

	harnessFailed := false
	for _, m := range ms {
		res.Rows = append(res.Rows, m.rows...)
	}
	for round := 1; round <= cfg.rounds; round++ {
		r.round = round
		order := slices.Clone(targets)
		if round%2 == 0 { // so that a drift in the machine's load favours no target
			slices.Reverse(order)
		}
		for _, m := range ms {
			for _, t := range order {
				began := time.Now()
				values, err := r.measure(m, t)
				if interrupted.Load() {
					select {} // the signal handler is ending the process
				}
				if err != nil && !isSkip(err) && t.name == targetDirect {
					harnessFailed = true
				}
				res.record(m, t, values, err)
				if err != nil && !isSkip(err) {
					r.note("%s, %s, round %d: %v", t.name, m.name, round, err)
				}
				logProgress(round, m, t, values, err, time.Since(began))
			}
		}
		if backends.exited() {
			fmt.Fprintf(os.Stderr, "bench: the backend process died: %s\n", backends.output())
			return 1
		}
	}
	for _, t := range targets {
		if t.unavailable != "" {
			r.note("%s unavailable: %s", t.name, t.unavailable)
		}
	}
	if len(r.connIPs) > 0 {
		var used []string
		for _, t := range targets {
			if n, ok := r.connIPs[t.name]; ok {
				used = append(used, fmt.Sprintf("%s %d", t.name, n))
			}
		}
		r.note("short connections: clients from %s up, each connecting %d times, %d connections apart "+
			"(with pins, 1 connection in %d makes a pin and the others look one up); distinct client IPs, most in one run: %s",
			connSources.addr(0), connReuse, connSpacing, connReuse, strings.Join(used, ", "))
	}

	fmt.Println()
	printTable(os.Stdout, res)
	if len(r.notes) > 0 {
		fmt.Println("\nNotes:")
		for _, n := range r.notes {
			fmt.Println("  - " + n)
		}
	}
	if cfg.jsonOut != "" {
		if err := res.write(cfg.jsonOut); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
	}
	if harnessFailed {
		fmt.Fprintln(os.Stderr, "bench: a measurement of the direct target failed: the harness itself is broken")
		return 1
	}
	return 0
}

var interrupted atomic.Bool

// stopOnSignal makes an interrupt stop the child processes (no stray proxy or
// backend keeps its ports) and then die of the same signal, so that a calling
// shell script stops too.
func stopOnSignal(tmp string) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		interrupted.Store(true)
		fmt.Fprintf(os.Stderr, "\nbench: %v: stopping child processes\n", s)
		killChildren()
		os.RemoveAll(tmp)
		signal.Reset()
		_ = syscall.Kill(os.Getpid(), s.(syscall.Signal))
		// Still here: the signal was ignored when we started (a background job).
		time.Sleep(100 * time.Millisecond)
		os.Exit(128 + int(s.(syscall.Signal)))
	}()
}

// raiseNoFile lifts the soft (and, when allowed, the hard) open-files limit:
// the idle test needs about 2 × idle-conns sockets in the proxy. Children
// inherit the new limit.
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	const want = 1 << 16
	if lim.Max < want {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}); err == nil {
			return want, nil
		}
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return lim.Cur, err
	}
	return lim.Cur, nil
}

func printHeader(w *os.File, r *runner, res *results) {
	fmt.Fprintf(w, "stickylb dataplane benchmark, %s\n", time.Now().Format(time.RFC3339))
	fmt.Fprintf(w, "CPUs: %d (GOMAXPROCS %d) %s; kernel %s; load average %s\n",
		res.CPUs, res.GOMAXPROCS, cpuModel(), procFirstLine("/proc/sys/kernel/osrelease"), loadAverage())
	fmt.Fprintf(w, "driver: %s; backends 127.0.1.1-4 in a child process; each test: %s warm-up + %s window, best of %d round(s)\n",
		runtime.Version(), r.warmup, r.window, r.rounds)
	// The algorithm matters: where it is BBR without the fq qdisc, every
	// sender paces with a timer (README, Performance).
	fmt.Fprintf(w, "TCP congestion control: %s (system default, used by the driver, the backends and HAProxy)\n",
		procFirstLine("/proc/sys/net/ipv4/tcp_congestion_control"))
	if r.extraArgs != "" {
		fmt.Fprintf(w, "stickylb proxy flags: %s\n", r.extraArgs)
	}
	if res.HAProxy != "" {
		fmt.Fprintf(w, "haproxy: %s\n", res.HAProxy)
	}
	if res.Nginx != "" {
		fmt.Fprintf(w, "nginx: %s (stream module, UDP tests only)\n", res.Nginx)
	}
}

func nginxVersion(bin string) string {
	out, err := exec.Command(bin, "-v").CombinedOutput()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimPrefix(strings.TrimSpace(first), "nginx version: ")
}

func haproxyVersion(bin string) string {
	out, err := exec.Command(bin, "-v").Output()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(first)
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func loadAverage() string {
	f := strings.Fields(procFirstLine("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func procFirstLine(path string) string {
	b, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return "unknown"
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(first)
}
