#!/usr/bin/env bash
# make bench: the dataplane benchmark report (see hack/bench/main.go).
#
#   1. builds bin/stickylb;
#   2. installs HAProxy, and nginx with its stream module (the UDP peer),
#      from Debian when they are missing and we are root;
#   3. runs the driver: direct vs stickylb proxy vs HAProxy, one table; in
#      the short-connections test also stickylb-nopins, the same binary with
#      its rule's sessionPersistenceTimeoutInMinutes: 0 (no pins), back to
#      back with stickylb (pins on, the default), in a table of its own; and
#      stickylb-v2 (proxyProtocol: V2) and haproxy-v2 (send-proxy-v2), over
#      backends that require and parse the PROXY v2 header (a second port,
#      go-proxyproto), next to stickylb (None), in a third table; and in
#      the UDP tests (64 B from 32 sources, 64 B from 1,000 sources, 1,400 B)
#      nginx's stream module (hash $remote_addr consistent), its own child
#      process with its own prefix and configuration, next to stickylb in a
#      table of its own;
#   4. runs the Go microbenchmarks of ./dataplane/... (among them the heap
#      per pinned client, BenchmarkPinMemory's B/pin, and what pins add to
#      a new flow's backend choice, BenchmarkChooseNewFlow);
#   5. runs the controller benchmarks of ./controllers/ (envtest: a real
#      kube-apiserver and etcd, the manager in-process; needs root), and
#      the scale benchmark at 1,000 rules x 100 and x 10 endpoints
#      (hack/bench-scale.sh: the real binary against a real API server;
#      make bench-scale runs 10,000 x 100);
#   6. prints the issue's targets as PASS/FAIL/SKIP (pins on vs off: short
#      connections/s at least 0.95x, under 100 B per pinned client; PROXY
#      v2: short connections/s of stickylb V2 at least HAProxy
#      send-proxy-v2's and at least 0.95x stickylb None's; UDP datagrams/s
#      at least 1.2x nginx's).
#
# It is a report: it exits 0 even when a step fails, and says which.
# Extra driver flags go in BENCH_FLAGS, e.g. BENCH_FLAGS="-rounds 2".
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The driver stops its children and re-raises the signal; stop here too.
trap 'exit 130' INT
trap 'exit 143' TERM

# Two sockets per idle proxied connection, 8,000 of them.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

step() { printf '\n== %s\n' "$*"; }

step "build bin/stickylb"
stickylb=bin/stickylb
if ! CGO_ENABLED=0 go build -trimpath -o bin/stickylb .; then
	echo "bench: building bin/stickylb failed: the stickylb column is unavailable"
	stickylb=
fi

step "haproxy"
if ! command -v haproxy >/dev/null && [ "$(id -u)" = 0 ]; then
	echo "installing haproxy from Debian"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
fi
if command -v haproxy >/dev/null; then
	haproxy -v | head -n 2
else
	echo "bench: haproxy is not installed and could not be: the HAProxy column is unavailable"
fi

step "nginx (stream module, the UDP peer)"
if [ "$(id -u)" = 0 ] && { ! command -v nginx >/dev/null || ! nginx -V 2>&1 | grep -q -- '--with-stream' ||
	{ nginx -V 2>&1 | grep -q -- '--with-stream=dynamic' && ! ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null 2>&1; }; }; then
	echo "installing nginx and libnginx-mod-stream from Debian (not started as a service)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-stream >/dev/null
fi
if command -v nginx >/dev/null; then
	nginx -v 2>&1
else
	echo "bench: nginx is not installed and could not be: the nginx column is unavailable"
fi

step "dataplane benchmark"
if go build -o "$tmp/bench" ./hack/bench; then
	"$tmp/bench" -stickylb "$stickylb" -json "$tmp/results.json" ${BENCH_FLAGS:-} ||
		echo "bench: the benchmark driver failed (exit $?)"
else
	echo "bench: building the benchmark driver failed"
fi

step "Go microbenchmarks: go test -run=NONE -bench=. -benchmem ./dataplane/..."
go test -run=NONE -bench=. -benchmem ./dataplane/... 2>&1 | tee "$tmp/micro.txt" ||
	echo "bench: some microbenchmark packages failed"

controller_bench='EndpointSliceToDataplane|ThousandRulesReady'
step "controller benchmarks: go test -run=NONE -bench='$controller_bench' -benchtime=1x ./controllers/"
if assets=$(hack/test-binaries.sh | tail -n 1) && [ -n "$assets" ]; then
	KUBEBUILDER_ASSETS="$assets" go test -run=NONE -bench="$controller_bench" -benchtime=1x -timeout=15m ./controllers/ 2>&1 |
		tee "$tmp/controllers.txt" || echo "bench: the controller benchmarks failed"
else
	echo "bench: building the envtest binaries failed: no controller benchmarks"
fi

step "per-replica status: go test -run=NONE -bench=StatusWritesUnderChurn -benchtime=1x ./test/e2e/ (1,000 rules x 2 replicas)"
if [ -n "${assets:-}" ]; then
	KUBEBUILDER_ASSETS="$assets" go test -run=NONE -bench=StatusWritesUnderChurn -benchtime=1x -timeout=20m ./test/e2e/ 2>&1 |
		tee "$tmp/replicas.txt" || echo "bench: the per-replica status benchmark failed"
fi

step "scale benchmark: hack/bench-scale.sh 1000x100,1000x10 (the real binary, a real API server; make bench-scale runs 10000x100)"
SCALE_OUT="$tmp/scale.txt" SCALE_NO_VERDICT=1 hack/bench-scale.sh 1000x100,1000x10 ||
	echo "bench: the scale benchmark failed"

# metric BENCHMARK UNIT: the value a benchmark reported in UNIT, if any.
metric() {
	[ -s "$tmp/controllers.txt" ] || return 0
	awk -v b="$1" -v u="$2" '$1 ~ ("^Benchmark" b "(-[0-9]+)?$") {
		for (i = 3; i < NF; i++) if ($(i + 1) == u) { print $i; exit }
	}' "$tmp/controllers.txt"
}
# verdict RESULT DETAIL: one more line of the targets, aligned with the
# driver's (whose widest target is "PROXY v2: stickylb ≥ HAProxy
# send-proxy-v2, short connections", 61 characters).
verdict() { printf '%s  %-61s  %s\n' "$1" "$target" "$2"; }
# below A LIMIT: whether A < LIMIT.
below() { awk -v a="$1" -v l="$2" 'BEGIN { exit !(a < l) }'; }

step "targets"
if [ -s "$tmp/results.json" ]; then
	"$tmp/bench" -verdict -json "$tmp/results.json" -microbench "$tmp/micro.txt" ||
		echo "bench: judging the targets failed"
else
	echo "bench: no results to judge"
fi
target="EndpointSlice to dataplane p99 < 200 ms"
p50=$(metric EndpointSliceToDataplane p50-ms) p99=$(metric EndpointSliceToDataplane p99-ms)
if [ -z "$p99" ]; then
	verdict SKIP "no BenchmarkEndpointSliceToDataplane result"
elif below "$p99" 200; then
	verdict PASS "p99 $p99 ms (p50 $p50 ms)"
else
	verdict FAIL "p99 $p99 ms (p50 $p50 ms)"
fi
target="1,000 rules Ready < 60 s, RSS < 300 MiB"
ready=$(metric ThousandRulesReady all-ready-s) rss=$(metric ThousandRulesReady rss-MiB) heap=$(metric ThousandRulesReady heap-MiB)
if [ -z "$ready" ] || [ -z "$rss" ]; then
	verdict SKIP "no BenchmarkThousandRulesReady result"
elif below "$ready" 60 && below "$rss" 300; then
	verdict PASS "all Ready in $ready s, RSS $rss MiB (Go heap $heap MiB)"
else
	verdict FAIL "all Ready in $ready s, RSS $rss MiB (Go heap $heap MiB)"
fi

if [ -s "$tmp/scale.txt" ]; then
	hack/bench-scale.sh --verdict "$tmp/scale.txt"
else
	target="scale benchmark" verdict SKIP "no BenchmarkScale result"
fi

echo
echo "bench: total $(($(date +%s) - started)) s"
exit 0
