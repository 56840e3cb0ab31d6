#!/usr/bin/env bash
# The scale benchmark (test/scale): the real stickylb binary against a real
# kube-apiserver and etcd, N rules each with its own port, its own Service
# and one EndpointSlice of E ready endpoints. It reports the time until all
# rules are Ready, the manager's RSS and Go heap, what one rule costs (RSS,
# heap, metric series, file descriptors) and slice-to-dataplane p50/p99, then
# judges the issue's targets.
#
#   hack/bench-scale.sh                 # make bench-scale: 10000x100
#   hack/bench-scale.sh 1000x100,1000x10
#   hack/bench-scale.sh --verdict FILE  # only judge an earlier run's output
#
# SCALE_OUT=FILE keeps the benchmark's output; SCALE_PROFILES=DIR writes a
# heap profile per case; SCALE_GOMEMLIMIT=230MiB runs stickylb with that
# soft limit, as a 256Mi container limit sets it; SCALE_NO_VERDICT=1 leaves
# the targets out. Needs root (a network namespace of its own).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# metric FILE CASE UNIT: the value BenchmarkScale/CASE reported in UNIT.
metric() {
	awk -v c="$2" -v u="$3" '$1 ~ ("^BenchmarkScale/" c "(-[0-9]+)?$") {
		for (i = 3; i < NF; i++) if ($(i + 1) == u) { print $i; exit }
	}' "$1"
}
below() { awk -v a="$1" -v l="$2" 'BEGIN { exit !(a < l) }'; }
line() { printf '%s  %-61s  %s\n' "$1" "$2" "$3"; }

# verdict FILE: the targets of every case in FILE.
verdict() {
	local f=$1 found=
	for c in $(awk '$1 ~ /^BenchmarkScale\/[0-9]+x[0-9]+(-[0-9]+)?$/ { sub(/^BenchmarkScale\//, "", $1); sub(/-[0-9]+$/, "", $1); print $1 }' "$f"); do
		found=1
		local ready rss heap live p50 p99 detail ok=PASS
		ready=$(metric "$f" "$c" all-ready-s) rss=$(metric "$f" "$c" rss-MiB) heap=$(metric "$f" "$c" heap-MiB) live=$(metric "$f" "$c" live-MiB)
		p50=$(metric "$f" "$c" p50-ms) p99=$(metric "$f" "$c" p99-ms)
		detail="all Ready in $ready s, RSS $rss MiB (heap $heap MiB, $live MiB after a GC), slice to dataplane p50 $p50 ms, p99 $p99 ms"
		case $c in
		10000x100)
			below "$ready" 60 && below "$rss" 1024 && below "$p99" 50 || ok=FAIL
			line "$ok" "$c: all Ready < 60 s, RSS < 1 GiB, slice p99 < 50 ms" "$detail" ;;
		1000x100)
			below "$rss" 256 || ok=FAIL
			line "$ok" "$c: RSS < 256 MiB" "$detail" ;;
		*)
			line INFO "$c" "$detail" ;;
		esac
		printf '      per rule: %s KiB RSS, %s KiB heap after a GC, %s metric series, %s fds\n' \
			"$(metric "$f" "$c" rss-KiB/rule)" "$(metric "$f" "$c" live-KiB/rule)" "$(metric "$f" "$c" series/rule)" "$(metric "$f" "$c" fds/rule)"
	done
	[ -n "$found" ] || line SKIP "scale benchmark" "no BenchmarkScale result"
}

if [ "${1:-}" = --verdict ]; then
	verdict "$2"
	exit 0
fi

sizes=${1:-10000x100}
started=$(date +%s)
out=${SCALE_OUT:-$(mktemp)}
[ -n "${SCALE_OUT:-}" ] || trap 'rm -f "$out"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if ! CGO_ENABLED=0 go build -trimpath -o bin/stickylb .; then
	echo "bench-scale: building bin/stickylb failed"
	exit 1
fi
if ! assets=$(hack/test-binaries.sh kube-apiserver etcd | tail -n 1) || [ -z "$assets" ]; then
	echo "bench-scale: building the envtest binaries failed"
	exit 1
fi
args=()
[ -z "${SCALE_GOMEMLIMIT:-}" ] || args=(-gomemlimit "$SCALE_GOMEMLIMIT")
if [ -n "${SCALE_PROFILES:-}" ]; then
	mkdir -p "$SCALE_PROFILES" && args+=(-heapprofile "$(cd "$SCALE_PROFILES" && pwd)")
fi
echo "scale benchmark: $sizes (go test -run=NONE -bench=Scale -benchtime=1x ./test/scale/ -scale=$sizes)"
KUBEBUILDER_ASSETS="$assets" go test -run=NONE -bench=Scale -benchtime=1x -timeout=60m ./test/scale/ \
	-scale="$sizes" -stickylb="$PWD/bin/stickylb" "${args[@]}" 2>&1 | tee "$out" ||
	echo "bench-scale: the scale benchmark failed"
if [ -z "${SCALE_NO_VERDICT:-}" ]; then
	echo
	verdict "$out"
fi
echo
echo "bench-scale: total $(($(date +%s) - started)) s"
