# meshlet — one binary, four test tiers. `make test` runs every tier; `.ci/run`
# calls exactly that. See README.md.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/meshlet/meshlet/cmd/meshlet/app/version.Version=$(VERSION)
BIN       := bin/meshlet
K8S_BINS  := $(shell test/bin/build-k8s.sh --print-dir)
GOTEST    ?= $(GO) test
CACHE     ?= $(or $(MESHLET_CACHE),$(HOME)/.cache/meshlet)
IMAGES    ?= $(CACHE)/images
TESTFLAGS ?= -race -count=1 -timeout 30m
GOLANGCI_LINT_VERSION := v2.15.0
GOLANGCI_LINT ?= $(CACHE)/tools/golangci-lint-$(GOLANGCI_LINT_VERSION)

.PHONY: all build deps test test-unit test-privileged test-envtest test-e2e bench bench-fortio lint envtest-bins k8s-bins images manifests demo cluster-down clean

all: build

## build: the static meshlet binary in bin/
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/meshlet

## test: every tier — unit, privileged (root: netns + iptables), envtest (real
## kube-apiserver + etcd; the chart tests there include the manifests/ drift
## check), and the real-cluster e2e tier (test-e2e). Needs root: it stops at
## once, saying so, rather than pass with the privileged tiers skipped. It
## first installs the Debian packages the tiers need when they are missing.
test:
	@test/bin/ensure-deps.sh --require-root
	$(MAKE) lint envtest-bins
	KUBEBUILDER_ASSETS=$(K8S_BINS) $(GOTEST) $(TESTFLAGS) ./...
	$(MAKE) test-e2e

## deps: install the Debian packages the test tiers need, when missing (root).
deps:
	test/bin/ensure-deps.sh

## test-e2e: the real single-node cluster tier (test/e2e): builds the images and
## the cluster binaries (cached), brings the cluster up, runs the suite, tears it down.
test-e2e: images k8s-bins
	@test/bin/ensure-deps.sh --require-root
	MESHLET_E2E=1 MESHLET_IMAGES=$(IMAGES) $(GOTEST) -count=1 -timeout 40m -v ./test/e2e/

## manifests: regenerate manifests/ from charts/meshlet (make test checks for drift).
manifests:
	$(GO) run ./test/chart/render -chart charts/meshlet -out manifests

## demo: bring the test cluster up and run the README quickstart, printing what a user sees.
demo: images k8s-bins
	MESHLET_IMAGES=$(IMAGES) $(GO) run ./test/e2e/demo

## cluster-down: stop the test cluster and restore the host.
cluster-down:
	$(GO) run ./test/cluster/mlkctl down

## test-unit: the fast tier: no root, no API server (privileged and envtest tests skip under -short).
test-unit:
	$(GOTEST) -short -count=1 ./...

## test-privileged: only the tests that need root, network namespaces and iptables.
test-privileged:
	@test/bin/ensure-deps.sh --require-root
	$(GOTEST) $(TESTFLAGS) -run 'Privileged' ./...

## test-envtest: only the tests against a real kube-apiserver and etcd.
test-envtest: envtest-bins
	KUBEBUILDER_ASSETS=$(K8S_BINS) $(GOTEST) $(TESTFLAGS) -run 'Envtest' ./...

## envtest-bins: build kube-apiserver, etcd and kubectl from the Go module proxy (cached).
envtest-bins:
	test/bin/build-k8s.sh envtest

## k8s-bins: build every cluster binary (cached).
k8s-bins:
	test/bin/build-k8s.sh all

## bench: Go benchmarks of the hot paths (compare runs with benchstat), under
## the same lock as fortio.sh so two measurements never share the cores.
bench: bench-fortio
	flock /tmp/meshlet-bench.lock $(GOTEST) -run '^$$' -bench . -benchmem -count=1 ./...

## bench-fortio: fortio load through client and server sidecars in netns vs direct,
## haproxy and nginx, plus 100 hot restarts under load (root) → docs/benchmarks.md.
bench-fortio:
	test/bench/fortio.sh

## lint: gofmt, go vet, golangci-lint (.golangci.yml) and a tidy go.mod/go.sum.
lint: $(GOLANGCI_LINT)
	@fmt=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$fmt" ]; then echo "gofmt would change:"; echo "$$fmt"; exit 1; fi
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null 2>&1 || { echo "go.mod/go.sum are not tidy (run go mod tidy):"; $(GO) mod tidy -diff; exit 1; }
	$(GOLANGCI_LINT) run ./...

## golangci-lint, installed from the Go module proxy on first use and cached
## per version outside the work tree (CI installs it the same way).
$(GOLANGCI_LINT):
	@mkdir -p $(dir $@)
	tmp=$$(mktemp -d) && GOBIN=$$tmp $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION) && \
	  mv $$tmp/golangci-lint $@ && rmdir $$tmp

## images: the meshlet, pause and demo image tarballs (no Docker, no registry) in $(IMAGES).
images: build
	$(GO) run ./test/images/build -meshlet $(BIN) -out $(IMAGES) -debs $(CACHE)/debs

clean:
	rm -rf bin
