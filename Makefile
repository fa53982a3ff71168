# gateway-operator — run `make help` for the targets.

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

# Tool versions are pinned here; tools are installed into ./bin by the targets that need them.
CONTROLLER_GEN_VERSION ?= v0.23.0
LOCALBIN ?= $(CURDIR)/bin
CONTROLLER_GEN ?= $(LOCALBIN)/controller-gen-$(CONTROLLER_GEN_VERSION)
HELM_VERSION ?= v3.22.0
HELM ?= $(LOCALBIN)/helm-$(HELM_VERSION)
GOLANGCI_LINT_VERSION ?= v2.15.0
GOLANGCI_LINT ?= $(LOCALBIN)/golangci-lint-$(GOLANGCI_LINT_VERSION)

# Heavy test dependencies (kube-apiserver, etcd, kubectl, the systemd host template) are built
# once per machine and cached here, outside the repository.
export XDG_CACHE_HOME ?= $(HOME)/.cache
GO_TEST_FLAGS ?=

# What every test and benchmark run gets: the real dependencies, and GATEWAY_TEST_REQUIRE_ALL,
# which turns a missing dependency into a failure instead of a skip.
TEST_ENV = KUBEBUILDER_ASSETS="$$(hack/control-plane.sh)" \
	GATEWAY_CONTROLLER_MANAGER="$$(hack/controller-manager.sh)" \
	HELM=$(HELM) \
	GATEWAY_SYSTEMD_ROOTFS="$$(hack/systemd-rootfs.sh)" \
	GATEWAY_MICROVM_GUEST="$$(hack/microvm-guest.sh)" \
	GATEWAY_TEST_REQUIRE_ALL=1 \
	CONTROLLER_GEN=$(CONTROLLER_GEN)

##@ General

.PHONY: help
help: ## Show the targets.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate the deepcopy code of the API types.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate the CRD and RBAC manifests under config/.
	$(CONTROLLER_GEN) crd rbac:roleName=gateway-operator-manager paths="./api/..." paths="./controllers/..." \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	hack/sync-chart.sh

.PHONY: verify-generated
verify-generated: $(CONTROLLER_GEN) ## Fail if generated code, manifests or the chart's copies are stale.
	CONTROLLER_GEN=$(CONTROLLER_GEN) hack/verify-generated.sh
	hack/sync-chart.sh --check

.PHONY: fmt
fmt: ## Run gofmt on the tree (fails in CI if a file is not formatted).
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './bin/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

.PHONY: vet
vet: ## Run go vet.
	go vet ./...

.PHONY: lint
lint: lint-shell lint-go ## Lint shell scripts and Go code.

.PHONY: lint-shell
lint-shell: ## Lint the shell scripts: shellcheck, and pipelines that fail at random under pipefail.
	hack/lint-shell.sh

.PHONY: lint-go
lint-go: $(GOLANGCI_LINT) ## Lint Go code with the pinned golangci-lint and .golangci.yml.
	$(GOLANGCI_LINT) run ./...

.PHONY: build
build: ## Build the binaries into ./bin: manager, gateway-nodeagent, gateway-launch.
	CGO_ENABLED=0 go build -trimpath -o $(LOCALBIN)/ ./cmd/...

.PHONY: images
images: ## Build the manager and agent OCI images, their SPDX SBOMs and a kustomization pinning their digests into dist/images (no container engine needed).
	go run ./hack/images --out dist/images --config config/images.env

.PHONY: dist
dist: build ## Pack the bare-metal host install (binaries, unit, install script) into dist/, reproducibly.
	mkdir -p dist
	hack/dist-host.sh dist/gateway-agent-$$(sed -n 's/^IMAGE_TAG=//p' config/images.env)-linux-$$(go env GOARCH).tar.gz $(LOCALBIN)

# Where make install puts the node agent: / on a bare-metal host, or a folder holding a host's root.
DESTDIR ?= /

.PHONY: install
install: build ## Install the node agent, its unit and /etc/gateway-operator under DESTDIR (default /; idempotent).
	hack/install-host.sh --root $(DESTDIR) --bin $(LOCALBIN)

.PHONY: plugin
plugin: ## Build the kubectl plugin into ./bin/kubectl-gateway (put ./bin on PATH: kubectl gateway --help).
	CGO_ENABLED=0 go build -trimpath -o $(LOCALBIN)/kubectl-gateway ./cmd/kubectl-gateway

##@ Tests

.PHONY: test-deps
test-deps: ## Install and build what the tests need (idempotent; cached outside the repo).
	@hack/timed.sh "Debian packages" hack/host-deps.sh
	@hack/timed.sh "kube-apiserver, etcd, kubectl" hack/control-plane.sh >/dev/null
	@hack/timed.sh "kube-controller-manager" hack/controller-manager.sh >/dev/null
	@hack/timed.sh "systemd host template" hack/systemd-rootfs.sh >/dev/null
	@hack/timed.sh "microVM guest" hack/microvm-guest.sh >/dev/null

.PHONY: test
test: fmt vet verify-generated test-deps lint $(HELM) ## Run the linters and every test against a real API server and real systemd hosts.
	$(TEST_ENV) go test -count=1 -p 1 -timeout 30m $(GO_TEST_FLAGS) ./...
	hack/leftovers.sh

.PHONY: test-e2e
test-e2e: test-deps ## Run the end-to-end tests only.
	$(TEST_ENV) go test -count=1 $(GO_TEST_FLAGS) ./test/e2e/...
	hack/leftovers.sh

.PHONY: bench
bench: test-deps $(HELM) ## Run the benchmarks and print their numbers (a missing dependency fails, never skips).
	$(TEST_ENV) go test -run '^$$' -bench . -benchtime=1x -count=1 -timeout 30m ./...
	hack/leftovers.sh

##@ Run

.PHONY: run
run: ## Run the controller manager against the current kubeconfig (CRDs must be installed).
	go run ./cmd/manager --metrics-bind-address=0 --health-probe-bind-address=:8081

.PHONY: demo
demo: test-deps ## Bring up a local control plane, the operator and a sandboxed host, and apply the samples.
	go build -o $(LOCALBIN)/demo ./hack/demo
	GATEWAY_MICROVM_GUEST="$$(hack/microvm-guest.sh)" $(LOCALBIN)/demo up

.PHONY: demo-down
demo-down: ## Stop the demo and remove everything it made.
	go build -o $(LOCALBIN)/demo ./hack/demo
	$(LOCALBIN)/demo down

##@ Tools

$(HELM):
	mkdir -p $(LOCALBIN)
	hack/timed.sh "helm $(HELM_VERSION)" env GOBIN=$(LOCALBIN) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	mv $(LOCALBIN)/helm $(HELM)

$(GOLANGCI_LINT):
	mkdir -p $(LOCALBIN)
	hack/timed.sh "golangci-lint $(GOLANGCI_LINT_VERSION)" env GOBIN=$(LOCALBIN) go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(LOCALBIN)/golangci-lint $(GOLANGCI_LINT)

$(CONTROLLER_GEN):
	mkdir -p $(LOCALBIN)
	hack/timed.sh "controller-gen $(CONTROLLER_GEN_VERSION)" env GOBIN=$(LOCALBIN) go install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_GEN_VERSION)
	mv $(LOCALBIN)/controller-gen $(CONTROLLER_GEN)

.PHONY: controller-gen
controller-gen: $(CONTROLLER_GEN) ## Install the pinned controller-gen into ./bin.
	@echo $(CONTROLLER_GEN)
