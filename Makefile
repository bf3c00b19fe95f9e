# iam-key-operator — every entry point a person or CI needs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Every test step builds the whole workspace with the test-only failpoints (one feature set), so
# `unit`, `crds-check` and `integration` share one build of the operator.
TEST_FEATURES := --features iam-key-operator/failpoints
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
# The integration tests wait on the operator most of the time: more threads than cores pays.
TEST_THREADS ?= 8
DEV_DIR ?= $(CURDIR)/.dev
# The tools (kube-apiserver, etcd, kubectl, helm, moto, Argo CD's Lua) live outside the repo, per
# version, in ~/.cache/iam-key-operator; tests find them through `hack/<script> --path`.

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Build/install the real parts: kube-apiserver, etcd, kubectl, helm, Argo CD's gopher-lua (Go modules), moto and the AWS CLI (PyPI), Lua 5.1
	hack/k8s-tools.sh >/dev/null
	hack/argocd-lua.sh >/dev/null
	hack/moto.sh >/dev/null
	hack/lua.sh >/dev/null

.PHONY: build
build: ## Build the operator (release)
	$(CARGO) build --release --locked

.PHONY: crds
CHART_CRDS := charts/iam-key-operator/templates/crds.yaml

crds: ## Regenerate crds/ from the Rust types (and the chart's template and deploy/'s copies)
	$(CARGO) run --quiet --locked -- crd --out-dir crds --helm-template $(CHART_CRDS)
	cp crds/*.yaml deploy/crds/

.PHONY: crds-check
crds-check: ## Fail when crds/, the chart's CRD template or deploy/crds differ from what the code generates
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; mkdir $$tmp/crds; \
	$(MAKE) --no-print-directory --quiet test-build; \
	$(TARGET_DIR)/debug/iam-key-operator crd --out-dir $$tmp/crds --helm-template $$tmp/crds.yaml; \
	diff -ru crds $$tmp/crds || { echo "crds/ is stale: run 'make crds' and commit the result"; exit 1; }; \
	diff -u $(CHART_CRDS) $$tmp/crds.yaml || { echo "$(CHART_CRDS) is stale: run 'make crds' and commit the result"; exit 1; }; \
	diff -ru deploy/crds $$tmp/crds || { echo "deploy/crds is stale: run 'make crds' and commit the result"; exit 1; }

.PHONY: fmt-check
fmt-check:
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy:
	$(CARGO) clippy --locked --workspace --all-targets --all-features -- -D warnings

.PHONY: unit
unit: ## Unit and property tests (pure logic: planner, policy, schema, formats)
	$(CARGO) test --locked --workspace --lib --bins $(TEST_FEATURES)

.PHONY: integration
integration: tools ## Integration tests (one binary, tests/e2e) against a real kube-apiserver + etcd and moto
	$(CARGO) test --locked --workspace $(TEST_FEATURES) --test e2e -- --test-threads $(TEST_THREADS)

.PHONY: check
check: fmt-check clippy unit ## The edit loop: fmt, clippy, unit and property tests (no real parts needed)

.PHONY: test
test: ## Everything CI runs: tools, fmt, clippy, CRD drift, unit and integration tests
	@# The tools (Go builds, module and PyPI downloads) and the Rust build of the tests leave
	@# each other's idle core busy: on a fresh machine they overlap.
	$(MAKE) --no-print-directory -j2 tools test-build
	$(MAKE) --no-print-directory fmt-check clippy crds-check unit integration

.PHONY: test-build
test-build: ## Build everything the tests run (one feature set: the binary the integration tests start is this one)
	$(CARGO) test --locked --workspace --all-targets $(TEST_FEATURES) --no-run

.PHONY: soak
soak: tools ## Long fault runs (not in make test): random kills for 15 min with 200 resources, rate limit with 1,000
	IKO_SOAK_SECONDS=$${IKO_SOAK_SECONDS:-900} IKO_SOAK_RESOURCES=$${IKO_SOAK_RESOURCES:-200} \
	  $(CARGO) test --locked $(TEST_FEATURES) --test e2e soak:: -- --ignored --nocapture
	$(CARGO) test --locked $(TEST_FEATURES) --test e2e faults::bench_ -- --ignored --nocapture

.PHONY: bench
bench: tools ## Benchmarks against the floor (not in make test, ~40 min); rewrites docs/benchmarks.md and docs/img
	@# The binary the image ships (static musl, its allocator), built the way the Dockerfile builds it.
	hack/build-image-binary.sh >/dev/null
	$(CARGO) run --release --locked -p bench -- --all --report --fresh

.PHONY: timeline
timeline: ## Redraw the rotation timeline in docs/rotation.md and docs/rotation-timeline.svg from the planner
	$(CARGO) run --quiet --locked -p bench -- --timeline

.PHONY: argocd-cm
argocd-cm: ## Regenerate argocd/argocd-cm.yaml from the Lua scripts
	IKO_BLESS=1 $(CARGO) test --locked $(TEST_FEATURES) --test e2e argocd::argocd_cm

IMAGE ?= iam-key-operator:0.1.0
.PHONY: image
image: ## Build the container image (needs a Docker engine; the dev machines have none)
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make image needs a running Docker engine (docker info failed)"; exit 1; }
	docker build -t $(IMAGE) .

.PHONY: dev-up
dev-up: tools ## Start a local API server + IAM endpoint in the background; then `source .dev/env`
	$(CARGO) build --quiet --locked -p testenv
	target/debug/testenv down --state-dir $(DEV_DIR) >/dev/null 2>&1 || true
	mkdir -p $(DEV_DIR)
	rm -f $(DEV_DIR)/env
	@nohup target/debug/testenv up --state-dir $(DEV_DIR) --crds crds >$(DEV_DIR)/testenv.log 2>&1 & pid=$$!; \
	for i in $$(seq 1 120); do [ -f $(DEV_DIR)/env ] && break; kill -0 $$pid 2>/dev/null || break; sleep 1; done
	@[ -f $(DEV_DIR)/env ] || { echo "dev-up failed, see $(DEV_DIR)/testenv.log"; tail -20 $(DEV_DIR)/testenv.log; exit 1; }
	@echo "up. Use it with:  source $(DEV_DIR)/env && kubectl get iak -A"

.PHONY: dev-down
dev-down: ## Stop what dev-up (and demo) started
	@DEV_DIR=$(DEV_DIR) hack/dev-down.sh

.PHONY: demo
demo: ## Build, start the local environment, run the operator on an example, show the result
	hack/demo.sh
