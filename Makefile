# QMTL DAG Manager: developer entry points. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STACK  := $(PYTHON) hack/stack/stack.py
STAMP  := $(VENV)/.installed

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

NATIVE := $(wildcard src/native/Cargo.toml src/native/Cargo.lock src/native/src/*.rs src/native/*.pyi)

$(STAMP): pyproject.toml constraints.txt $(NATIVE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	bash hack/build-native.sh $(PY)
	@touch $@

venv: $(STAMP) ## create .venv, install the project with its dev tools (pinned by constraints.txt) and build the native extension

stack-up: ## build/fetch (cached) and start etcd, kube-apiserver, kube-controller-manager, Kafka, Neo4j
	$(STACK) up

stack-down: ## stop exactly the processes stack-up started
	$(STACK) down

stack-status: ## health of each server of the local stack
	$(STACK) status

proto: $(STAMP) ## regenerate the gRPC stubs and their type stubs from proto/
	bash hack/gen-proto.sh

proto-check: $(STAMP) ## fail if the committed gRPC stubs differ from what proto/ generates
	@tmp=$$(mktemp -d); bash hack/gen-proto.sh "$$tmp"; \
	  diff -r -x __pycache__ "$$tmp/qmtl_dagmanager/pb" src/qmtl_dagmanager/pb \
	  || { echo "gRPC stubs are stale: run 'make proto' and commit"; rm -rf "$$tmp"; exit 1; }; \
	  rm -rf "$$tmp"; echo "gRPC stubs are current"

crds: $(STAMP) ## regenerate crds/, the chart's CRDs and docs/crd-reference.md from the API models
	$(PY) hack/gen-crds.py

crds-check: $(STAMP) ## fail if crds/, the chart's CRDs or docs/crd-reference.md are stale
	@tmp=$$(mktemp -d); $(PY) hack/gen-crds.py "$$tmp"; \
	  for out in crds charts/qmtl-dagmanager/files/crds docs/crd-reference.md; do \
	    diff -r "$$tmp/$$out" "$$out" || { echo "$$out is stale: run 'make crds' and commit"; rm -rf "$$tmp"; exit 1; }; \
	  done; rm -rf "$$tmp"; echo "CRDs are current"

settings: $(STAMP) ## regenerate the README's configuration table from the Settings declarations
	$(PY) hack/gen-settings.py

settings-check: $(STAMP) ## fail if the README's configuration table is stale
	$(PY) hack/gen-settings.py --check

lint: $(STAMP) proto-check crds-check settings-check ## ruff, mypy --strict on src, tests, bench and hack, import-linter contracts, generated code current
	$(VENV)/bin/ruff check src tests hack bench operator
	$(VENV)/bin/ruff format --check src tests hack bench operator
	$(VENV)/bin/mypy src tests bench hack
	$(VENV)/bin/lint-imports

fmt: $(STAMP) ## format and autofix
	$(VENV)/bin/ruff format src tests hack bench operator
	$(VENV)/bin/ruff check --fix src tests hack bench operator

unit: $(STAMP) ## unit tests and the contract suites on the twins (no servers, minutes)
	$(PY) -m pytest -m "not integration and not campaign and not chart" -q

rules-test: ## promtool (built once from the Go proxy): check the chart's Prometheus rules and run their unit tests
	@promtool=$$(bash hack/stack/build-promtool.sh) && \
	  $$promtool check rules charts/qmtl-dagmanager/files/rules/qmtl-dagmanager.rules.yaml && \
	  $$promtool test rules tests/rules/qmtl-dagmanager.test.yaml

test-fast: $(STAMP) ## the fast stage: lint, the rules' promtool tests, then `make unit`
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory rules-test
	$(MAKE) --no-print-directory unit

test-stack: $(STAMP) ## the stack stage: the real local stack (started if needed), integration and e2e tests, the fuzzing campaign
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) -m pytest -m "(integration or campaign) and not brokers" -q

test-brokers: $(STAMP) ## the broker fault suite: the stack with Kafka as three KRaft nodes (restarted so if needed), brokers killed under load
	$(STACK) up --brokers 3
	$(PY) -m pytest -m brokers -q -o log_cli=true --log-cli-level=WARNING

test: $(STAMP) ## all four stages: test-fast, test-stack, test-brokers, then e2e-node (the image and the chart on a real node)
	@echo "[test] $$(date -u +%H:%M:%S) fast stage: lint, unit tests, contract suites on the twins"
	$(MAKE) --no-print-directory test-fast
	@echo "[test] $$(date -u +%H:%M:%S) stack stage: real servers, integration, e2e, fuzzing campaign"
	$(MAKE) --no-print-directory test-stack
	@echo "[test] $$(date -u +%H:%M:%S) broker stage: Kafka as three KRaft nodes, brokers killed"
	$(MAKE) --no-print-directory test-brokers
	@echo "[test] $$(date -u +%H:%M:%S) node stage: make image, the chart on a real node, tests/e2e and tests/chart"
	$(MAKE) --no-print-directory e2e-node

bench: $(STAMP) ## benchmarks of the real code paths (figures go to README: Performance)
	$(PY) bench/core_bench.py
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/adapters_bench.py
	$(PY) bench/topics_bench.py
	$(PY) bench/sidecar_bench.py
	$(PY) bench/sidecar_bench.py --tracing
	$(PY) bench/writers_bench.py

bench-gateway: $(STAMP) ## the Gateway's pattern: Diff under a 0.1 s wait, retried each second, on Neo4j + Kafka
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/gateway_bench.py

bench-scale: $(STAMP) ## growth: diff latency against stored nodes (embedded, Neo4j + Kafka), docs/scale.svg
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/scale_bench.py

bench-operator: $(STAMP) ## operator: 100 StrategyDAGs x 100 nodes until Ready, then RSS with 1,000 StrategyDAGs
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/operator_bench.py
	$(PY) bench/operator_rss.py

bench-writers: $(STAMP) ## soak: 3 sidecar processes + the operator on one graph and Kafka, invariants checked
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/writers_bench.py

HELM = $$(bash hack/stack/build-helm.sh)

manifests: ## render manifests/install.yaml from the chart (builds helm once from the Go proxy)
	@helm=$(HELM); { \
	  echo "# Generated by \`make manifests\` from charts/qmtl-dagmanager: do not edit."; \
	  echo "# First: kubectl create namespace qmtl-system; Secrets qmtl-dagmanager-neo4j (key neo4j-password) and qmtl-dagmanager-s3 (keys access-key, secret-key: the archive bucket s3://qmtl-archives)."; \
	  $$helm template qmtl-dagmanager charts/qmtl-dagmanager --namespace qmtl-system \
	    --set neo4j.existingSecret=qmtl-dagmanager-neo4j; } > manifests/install.yaml
	@echo "manifests/install.yaml rendered"

fuzz: $(STAMP) ## a 10-minute coverage-guided campaign on the DAG parser (corpus in .fuzz/)
	@mkdir -p .fuzz && cp -n tests/data/sample-dag.json .fuzz/ 2>/dev/null || true
	$(PY) tests/fuzz/dag_parser.py -max_total_time=600 .fuzz

image: $(STAMP) ## build the image with podman: a base from Debian packages, wheels from the pinned index (IMAGE, IMAGE_BASE)
	bash hack/image/build.sh

stack-up-node: ## the stack plus a real node (containerd, kubelet, kube-scheduler, kube-proxy; root)
	$(STACK) up --node

e2e-node: $(STAMP) ## the chart end to end on a real node of the local stack (root; podman, containerd; no Docker)
	bash hack/e2e/node.sh

e2e-kind: $(STAMP) ## the end-to-end suite on a kind cluster (needs a Docker engine; see README)
	bash hack/e2e-kind.sh

run: $(STAMP) ## the main job: stack (or $$KUBECONFIG), CRDs, operator + sidecar, samples Ready and the canary promoted
	$(PY) hack/run.py

clean: ## stop the stack and remove .stack/ and the virtualenv (the artefact cache stays)
	-$(STACK) down
	rm -rf .stack $(VENV)

.PHONY: test-brokers rules-test image stack-up-node e2e-node test-fast test-stack bench-scale bench-operator bench-writers fuzz e2e-kind manifests crds crds-check settings settings-check proto proto-check help venv stack-up stack-down stack-status lint fmt unit test bench run clean
