#!/usr/bin/env bash
# make bench: the dataplane benchmark report (see hack/bench/main.go).
#
#   1. builds bin/stickylb;
#   2. installs HAProxy from Debian when it is missing and we are root;
#   3. runs the driver: direct vs stickylb proxy vs HAProxy, one table;
#   4. runs the Go microbenchmarks of ./dataplane/...;
#   5. prints the issue's targets as PASS/FAIL/SKIP.
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

step "targets"
if [ -s "$tmp/results.json" ]; then
	"$tmp/bench" -verdict -json "$tmp/results.json" -microbench "$tmp/micro.txt" ||
		echo "bench: judging the targets failed"
else
	echo "bench: no results to judge"
fi

echo
echo "bench: total $(($(date +%s) - started)) s"
exit 0
