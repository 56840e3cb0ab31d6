#!/usr/bin/env bash
# Builds the real test binaries (kube-apiserver, kubectl, etcd, and the node's
# kubelet, kube-proxy, kube-controller-manager, kube-scheduler) and the pinned
# tools (controller-gen, helm) from the Go module proxy, because this project's
# build machines reach nothing else: setup-envtest and other downloaders of
# prebuilt binaries cannot work here.
#
# It builds only the tools named, and each once: they are cached outside the
# repository, keyed by version, in ~/.cache/stickylb (STICKYLB_CACHE
# overrides), so a second run takes a moment. Before each build it prints one
# line on stderr: what it builds and how long that usually takes; the go
# command's own output (module downloads, compiler errors) goes to a log file
# under the cache, whose end is shown when a build fails. On success the last
# line of stdout is the directory to use as KUBEBUILDER_ASSETS; it links every
# tool built so far.
#
#   hack/test-binaries.sh            # kube-apiserver, etcd, kubectl, controller-gen, helm
#   hack/test-binaries.sh kube-apiserver etcd kubectl   # what make demo runs
#   hack/test-binaries.sh --dry-run kube-apiserver   # builds nothing: prints "build TOOL" for each it would build
#
# STICKYLB_DRY_RUN=FILE makes every run a dry run that also appends those lines
# to FILE, so that hack/demo/tools_test.go sees what `make -n demo` would build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

dry_run=false
[ -z "${STICKYLB_DRY_RUN:-}" ] || dry_run=true
if [ "${1:-}" = --dry-run ]; then
	dry_run=true
	shift
fi

cache=${STICKYLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stickylb}
shown_cache=$cache
case $cache in "$HOME"/*) shown_cache="~${cache#"$HOME"}" ;; esac
declare -A version=(
	[kube-apiserver]=$KUBERNETES_VERSION [kubectl]=$KUBERNETES_VERSION
	[kubelet]=$KUBERNETES_VERSION [kube-proxy]=$KUBERNETES_VERSION
	[kube-controller-manager]=$KUBERNETES_VERSION [kube-scheduler]=$KUBERNETES_VERSION
	[etcd]=$ETCD_VERSION [controller-gen]=$CONTROLLER_TOOLS_VERSION [helm]=$HELM_VERSION
)
# What each tool is, for the progress line.
declare -A what=(
	[kube-apiserver]="the Kubernetes API server" [kubectl]="the Kubernetes CLI"
	[kubelet]="the node agent" [kube-proxy]="the Service proxy"
	[kube-controller-manager]="the controllers" [kube-scheduler]="the scheduler"
	[etcd]="the API server's database" [controller-gen]="the CRD and deepcopy generator"
	[helm]="the chart tool"
)
# How long each build step usually takes here (2 cores, shared with other
# builds), measured with STICKYLB_CACHE empty: with Go's module and build
# caches empty as on a fresh machine (the node group, etcd and controller-gen
# after the control group, as make test builds them), then with Go's build
# cache already holding the step.
declare -A takes=(
	[control]="7-11 min here (25 s once Go's build cache has it)"
	[node]="3-4 min here after kube-apiserver (15 s once Go's build cache has it)"
	[etcd]="35 s here after kube-apiserver (2 s once Go's build cache has it)"
	[controller-gen]="20 s here (2 s once Go's build cache has it)"
	[helm]="1 min here (3 s once Go's build cache has it)"
)

# Each tool is built once per version into its own directory; the assets
# directory printed at the end links the pinned set together.
assets="$cache/assets/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION"
work="$cache/work"
logs="$cache/logs"

log() { echo "test-binaries: $*" >&2; }
dur() { if (($1 >= 60)); then printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf '%ds' "$1"; fi; }
# words A B C: "A, B and C".
words() {
	local out=$1
	shift
	while [ $# -gt 1 ]; do out+=", $1" && shift; done
	[ $# -eq 0 ] || out+=" and $1"
	echo "$out"
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(kube-apiserver etcd kubectl controller-gen helm)
for t in "${want[@]}"; do
	[ -n "${version[$t]:-}" ] || { log "unknown tool $t"; exit 2; }
done

# plan: the tools of want missing from the cache, as build steps. The
# Kubernetes binaries of a group build in one `go build`, so the packages they
# share compile once, but a step builds only the tools asked for.
plan() {
	steps=()
	declare -gA step_tools=()
	local t s
	for t in "${want[@]}"; do
		[ ! -x "$cache/bin/$t-${version[$t]}/$t" ] || continue
		case $t in
		kube-apiserver | kubectl) s=control ;;
		kubelet | kube-proxy | kube-controller-manager | kube-scheduler) s=node ;;
		*) s=$t ;;
		esac
		case " ${step_tools[$s]:-} " in *" $t "*) continue ;; esac
		[ -n "${step_tools[$s]:-}" ] || steps+=("$s")
		step_tools[$s]+="${step_tools[$s]:+ }$t"
	done
}

# describe TOOL...: "kube-apiserver and kubectl v1.37.2 (the Kubernetes API server and the Kubernetes CLI)".
describe() {
	local t whats=()
	for t in "$@"; do whats+=("${what[$t]}"); done
	echo "$(words "$@") ${version[$1]} ($(words "${whats[@]}"))"
}

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

# newmod DIR MODULE: an empty throwaway module to build a pinned dependency from.
newmod() {
	rm -rf "$1" && mkdir -p "$1"
	printf 'module %s\n\ngo %s\n' "$2" "$GO_VERSION" >"$1/go.mod"
}

# kubernetes_module DIR: a throwaway module requiring k8s.io/kubernetes, with each
# staging module replaced by the published v0.x.y of the same release (outside
# its own tree k8s.io/kubernetes points them at ./staging).
kubernetes_module() {
	newmod "$1" stickylb.local/kubernetes-binaries
	(
		cd "$1"
		go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
		local modfile staging
		modfile=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
		staging=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$modfile")
		for m in $staging; do
			if grep -qE "^[[:space:]]+$m v" "$modfile"; then
				go mod edit -replace="$m=$m@$K8S_STAGING_VERSION"
			fi
		done
	)
}

# build_kubernetes TOOL...: builds Kubernetes binaries of one group in one `go
# build`; each lands in its own cache directory.
build_kubernetes() {
	local d="$work/kubernetes-$KUBERNETES_VERSION" out="$work/out-$1" t
	[ -f "$d/go.mod" ] && grep -q "k8s.io/kubernetes $KUBERNETES_VERSION" "$d/go.mod" || kubernetes_module "$d"
	local pkg=k8s.io/component-base/version
	local ldflags="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2) -X $pkg.gitTreeState=clean"
	local pkgs=()
	for t in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
	rm -rf "$out" && mkdir -p "$out"
	(cd "$d" && go build -ldflags "$ldflags" -o "$out/" "${pkgs[@]}")
	for t in "$@"; do
		mkdir -p "$cache/bin/$t-$KUBERNETES_VERSION"
		mv "$out/$t" "$cache/bin/$t-$KUBERNETES_VERSION/$t"
	done
}

build_etcd() {
	local d="$work/etcd-$ETCD_VERSION" bin="$cache/bin/etcd-$ETCD_VERSION"
	newmod "$d" stickylb.local/etcd-binary
	(
		cd "$d"
		go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
		go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
	)
}

build_controller_gen() {
	GOBIN="$cache/bin/controller-gen-$CONTROLLER_TOOLS_VERSION" GOFLAGS= go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
}

build_helm() {
	local major=${HELM_VERSION%%.*}
	GOBIN="$cache/bin/helm-$HELM_VERSION" GOFLAGS= go install \
		-ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
		"helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

# build STEP TOOL...
build() {
	local s=$1
	shift
	echo "building $* at $(date -u +%FT%TZ)"
	go version
	case $s in
	control | node) build_kubernetes "$@" ;;
	etcd) build_etcd ;;
	controller-gen) build_controller_gen ;;
	helm) build_helm ;;
	esac
}

if $dry_run; then
	plan
	for s in "${steps[@]}"; do
		# shellcheck disable=SC2086 # a step's tools are words
		log "would build $(describe ${step_tools[$s]}), usually ${takes[$s]}"
		for t in ${step_tools[$s]}; do
			echo "build $t"
			[ -z "${STICKYLB_DRY_RUN:-}" ] || echo "build $t" >>"$STICKYLB_DRY_RUN"
		done
	done
	echo "$assets"
	exit 0
fi

mkdir -p "$assets" "$work" "$logs"
# One builder at a time per cache; a second caller waits, then finds the cache warm.
exec 9>"$cache/.lock"
if ! flock -n 9; then
	log "waiting for another build in $shown_cache to finish"
	flock 9
fi

plan
if [ ${#steps[@]} -gt 0 ]; then
	all=()
	for s in "${steps[@]}"; do
		# shellcheck disable=SC2206 # a step's tools are words
		all+=(${step_tools[$s]})
	done
	log "building $(words "${all[@]}") from the Go module proxy, once only: cached in $shown_cache for later runs (Go's output: $shown_cache/logs/)"
	start=$SECONDS i=0
	for s in "${steps[@]}"; do
		i=$((i + 1))
		# shellcheck disable=SC2206 # a step's tools are words
		tools=(${step_tools[$s]})
		logfile="$logs/$(IFS=+ && echo "${tools[*]}")-${version[${tools[0]}]}.log"
		# The line ends when the build does, with its time.
		printf 'test-binaries: [%d/%d] %s, usually %s ... ' "$i" "${#steps[@]}" "$(describe "${tools[@]}")" "${takes[$s]}" >&2
		t0=$SECONDS
		set +e
		(
			set -e
			build "$s" "${tools[@]}"
		) >"$logfile" 2>&1
		rc=$?
		set -e
		if [ $rc -ne 0 ]; then
			echo "FAILED after $(dur $((SECONDS - t0)))" >&2
			log "the end of ${logfile/#"$cache"/$shown_cache}:"
			tail -n 40 "$logfile" | sed 's/^/    /' >&2
			exit $rc
		fi
		echo "$(dur $((SECONDS - t0)))" >&2
	done
	log "built $(words "${all[@]}") in $(dur $((SECONDS - start))); later runs find them in $shown_cache"
fi
for t in "${want[@]}"; do
	ln -sfn "$cache/bin/$t-${version[$t]}/$t" "$assets/$t"
done
echo "$assets"
