#!/usr/bin/env bash
# Builds the real test binaries (kube-apiserver, kubectl, etcd) and the pinned
# tools (controller-gen, helm) from the Go module proxy, because this project's
# build machines reach nothing else: setup-envtest and other downloaders of
# prebuilt binaries cannot work here.
#
# Everything is cached outside the repository, keyed by version, so a second
# run takes seconds. On success the last line of stdout is the directory to use
# as KUBEBUILDER_ASSETS; it also holds controller-gen and helm.
#
#   hack/test-binaries.sh            # kube-apiserver, etcd, kubectl, controller-gen, helm
#   hack/test-binaries.sh kubelet     # the node group: kubelet, kube-proxy, kube-controller-manager, kube-scheduler
#   hack/test-binaries.sh controller-gen   # just one of them
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

cache=${STICKYLB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stickylb}
# Each tool is built once per version into its own directory; the assets
# directory printed at the end links the pinned set together.
declare -A version=(
	[kube-apiserver]=$KUBERNETES_VERSION [kubectl]=$KUBERNETES_VERSION
	[kubelet]=$KUBERNETES_VERSION [kube-proxy]=$KUBERNETES_VERSION
	[kube-controller-manager]=$KUBERNETES_VERSION [kube-scheduler]=$KUBERNETES_VERSION
	[etcd]=$ETCD_VERSION [controller-gen]=$CONTROLLER_TOOLS_VERSION [helm]=$HELM_VERSION
)
assets="$cache/assets/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION"
work="$cache/work"
mkdir -p "$assets" "$work"

log() { echo "test-binaries: $*" >&2; }

# One builder at a time per cache; a second caller waits, then finds the cache warm.
exec 9>"$cache/.lock"
flock 9

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

# build_kubernetes GROUP: builds every binary of a group in one `go build`, so
# the packages they share compile once; each lands in its own cache directory.
build_kubernetes() {
	local d="$work/kubernetes-$KUBERNETES_VERSION" out="$work/out-$1" tools t
	case $1 in
	control) tools=(kube-apiserver kubectl) ;;
	node) tools=(kubelet kube-proxy kube-controller-manager kube-scheduler) ;;
	esac
	[ -f "$d/go.mod" ] && grep -q "k8s.io/kubernetes $KUBERNETES_VERSION" "$d/go.mod" || kubernetes_module "$d"
	local pkg=k8s.io/component-base/version
	local ldflags="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2) -X $pkg.gitTreeState=clean"
	local pkgs=()
	for t in "${tools[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
	log "building ${tools[*]} $KUBERNETES_VERSION in one go build (several minutes the first time)"
	rm -rf "$out" && mkdir -p "$out"
	(cd "$d" && go build -ldflags "$ldflags" -o "$out/" "${pkgs[@]}")
	for t in "${tools[@]}"; do
		mkdir -p "$cache/bin/$t-$KUBERNETES_VERSION"
		mv "$out/$t" "$cache/bin/$t-$KUBERNETES_VERSION/$t"
	done
}

build_etcd() {
	local d="$work/etcd-$ETCD_VERSION"
	newmod "$d" stickylb.local/etcd-binary
	(
		cd "$d"
		go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
		log "building etcd $ETCD_VERSION"
		go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
	)
}

build_controller_gen() {
	log "building controller-gen $CONTROLLER_TOOLS_VERSION"
	GOBIN="$bin" GOFLAGS= go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
}

build_helm() {
	local major=${HELM_VERSION%%.*}
	log "building helm $HELM_VERSION"
	GOBIN="$bin" GOFLAGS= go install \
		-ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
		"helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=(kube-apiserver etcd kubectl controller-gen helm)
for t in "${want[@]}"; do
	[ -n "${version[$t]:-}" ] || { echo "test-binaries: unknown tool $t" >&2; exit 2; }
	bin="$cache/bin/$t-${version[$t]}"
	if [ ! -x "$bin/$t" ]; then
		mkdir -p "$bin"
		case $t in
		kube-apiserver | kubectl) build_kubernetes control ;;
		kubelet | kube-proxy | kube-controller-manager | kube-scheduler) build_kubernetes node ;;
		etcd) build_etcd ;;
		controller-gen) build_controller_gen ;;
		helm) build_helm ;;
		esac
	fi
	ln -sfn "$bin/$t" "$assets/$t"
done
echo "$assets"
