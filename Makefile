# stickylb — see README.md. Every tool version is pinned in hack/versions.env.
SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
include hack/versions.env

# Built from the Go module proxy and cached outside the repo by hack/test-binaries.sh.
ASSETS = $(shell hack/test-binaries.sh kube-apiserver etcd kubectl controller-gen helm | tail -n 1)
# The same directory, with the one-node cluster's binaries too (test/cluster).
CLUSTER_ASSETS = $(shell hack/test-binaries.sh kube-apiserver etcd kubectl controller-gen helm kubelet kube-proxy kube-controller-manager kube-scheduler | tail -n 1)
CONTROLLER_GEN = $(shell hack/test-binaries.sh controller-gen | tail -n 1)/controller-gen
# Only what make demo and make dev run: envtest starts kube-apiserver and etcd,
# the demo runs kubectl. hack/demo/tools_test.go fails when this and what
# hack/demo runs differ.
DEMO_TOOLS = kube-apiserver etcd kubectl

GO_TEST_FLAGS ?=
BIN ?= bin

.PHONY: all
all: build

##@ Development

.PHONY: generate
generate: ## Generate deepcopy code from the API types.
	$(CONTROLLER_GEN) object:headerFile=hack/boilerplate.go.txt paths=./api/...

.PHONY: manifests
manifests: ## Generate the CRD and the RBAC role from the markers; copy the CRD into the Helm chart.
	$(CONTROLLER_GEN) crd rbac:roleName=stickylb-manager paths=./... \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	cp config/crd/bases/lb.stickylb.io_loadbalancerrules.yaml charts/stickylb/files/

.PHONY: fmt
fmt:
	go fmt ./...

.PHONY: vet
vet:
	go vet ./...

.PHONY: build
build: ## Build the stickylb binary into bin/.
	CGO_ENABLED=0 go build -trimpath -o $(BIN)/stickylb .

.PHONY: install-plugin
PLUGIN_DIR ?= $(shell go env GOPATH)/bin
install-plugin: build ## Install the kubectl plugin (kubectl stickylb ...): the stickylb binary as kubectl-stickylb in PLUGIN_DIR (default $$GOPATH/bin, which must be on your PATH).
	@mkdir -p "$(PLUGIN_DIR)"
	install -m 0755 $(BIN)/stickylb "$(PLUGIN_DIR)/kubectl-stickylb"
	@echo "installed $(PLUGIN_DIR)/kubectl-stickylb: try kubectl stickylb where RULE CLIENT_IP -n NAMESPACE"

.PHONY: image
image: ## Build the image as an OCI archive, bin/stickylb-image.tar, without docker (for kind load image-archive, ctr images import, docker load).
	arch=$$(go env GOARCH); \
	CGO_ENABLED=0 GOOS=linux GOARCH=$$arch go build -trimpath -ldflags="-s -w" -o $(BIN)/stickylb-linux-$$arch . && \
	go run ./hack/image -binary $(BIN)/stickylb-linux-$$arch -o $(BIN)/stickylb-image.tar

##@ Test

.PHONY: test
test: ## Every test, with the race detector: envtest suites (real kube-apiserver and etcd) and a real one-node cluster running the chart.
	@hack/host-tools.sh
	@assets="$(CLUSTER_ASSETS)"; echo "KUBEBUILDER_ASSETS=$$assets"; \
	test -z "$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files -co --exclude-standard '*.go'); exit 1; }; \
	go vet ./...; \
	KUBEBUILDER_ASSETS="$$assets" CONTROLLER_GEN="$$assets/controller-gen" \
		go test -race -count=1 -timeout 40m $(GO_TEST_FLAGS) ./...; \
	hack/leftovers.sh

# The demo program compiles with build's settings (no cgo, -trimpath), so it
# reuses the packages build just compiled: on an empty Go build cache that
# saves it 1m45s here.
.PHONY: demo
demo: demo-tools build ## Sticky sessions end to end on a local control plane, with nothing installed (about a minute).
	@assets=$$(hack/test-binaries.sh $(DEMO_TOOLS) | tail -n 1); \
	KUBEBUILDER_ASSETS="$$assets" CGO_ENABLED=0 go run -trimpath ./hack/demo -stickylb $(BIN)/stickylb

.PHONY: dev
dev: demo-tools build ## The demo's set-up, kept running: prints how to use kubectl against it.
	@assets=$$(hack/test-binaries.sh $(DEMO_TOOLS) | tail -n 1); \
	KUBEBUILDER_ASSETS="$$assets" CGO_ENABLED=0 go run -trimpath ./hack/demo -dev -stickylb $(BIN)/stickylb

# Before build, so that the first run shows one progress line per step rather
# than Go's module downloads: the tools' go output goes to a log, and go mod
# download fetches stickylb's own modules without a line each.
.PHONY: demo-tools
demo-tools: ## Build once (or find in the cache) only the tools make demo and make dev run.
	@hack/host-tools.sh
	@hack/test-binaries.sh $(DEMO_TOOLS) >/dev/null
	@go mod download
	@[ -x $(BIN)/stickylb ] || echo "demo: compiling stickylb and the demo program, usually 2-4 min here with Go's build cache empty, seconds after"

.PHONY: bench
bench: ## Dataplane benchmark: stickylb proxy vs direct vs HAProxy, then the Go microbenchmarks, the controller benchmarks and the issue's targets.
	hack/bench.sh

.PHONY: bench-scale
bench-scale: ## Scale benchmark at 10,000 rules x 100 endpoints: the real binary against a real API server, under the chart's 1Gi limit (needs root; see README's Performance for how long).
	SCALE_GOMEMLIMIT=$${SCALE_GOMEMLIMIT-920MiB} hack/bench-scale.sh 10000x100

.PHONY: assets
assets: ## Build (or find in the cache) the test binaries and print KUBEBUILDER_ASSETS.
	@echo "$(ASSETS)"

.PHONY: help
help:
	@awk 'BEGIN {FS = ":.*##"} /^[a-z-]+:.*##/ {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
