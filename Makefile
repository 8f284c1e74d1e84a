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

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv and install the project with its dev tools (pinned by constraints.txt)

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

crds: $(STAMP) ## regenerate crds/ from the API models (src/qmtl_dagmanager/kube/api.py)
	$(PY) hack/gen-crds.py

crds-check: $(STAMP) ## fail if crds/ differs from what the API models generate
	@tmp=$$(mktemp -d); $(PY) hack/gen-crds.py "$$tmp"; \
	  diff -r "$$tmp" crds || { echo "crds/ is stale: run 'make crds' and commit"; rm -rf "$$tmp"; exit 1; }; \
	  rm -rf "$$tmp"; echo "CRDs are current"

lint: $(STAMP) proto-check crds-check ## ruff, mypy --strict on src/, import-linter contracts, generated code current
	$(VENV)/bin/ruff check src tests hack bench
	$(VENV)/bin/ruff format --check src tests hack bench
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

fmt: $(STAMP) ## format and autofix
	$(VENV)/bin/ruff format src tests hack bench
	$(VENV)/bin/ruff check --fix src tests hack bench

unit: $(STAMP) ## unit tests only (no servers)
	$(PY) -m pytest -m "not integration" -q

test: $(STAMP) ## lint, then unit and integration tests against the real local stack (started if needed)
	$(MAKE) --no-print-directory lint
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) -m pytest -q

bench: $(STAMP) ## benchmarks of the real code paths (figures go to README: Performance)
	$(PY) bench/core_bench.py
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	$(PY) bench/adapters_bench.py
	$(PY) bench/sidecar_bench.py

run: $(STAMP) ## the main job: the local stack plus the sidecar (gRPC :50051, HTTP admin :8001) on it
	$(STACK) status >/dev/null 2>&1 || $(STACK) up
	@$(STACK) status
	@bash hack/sidecar-config.sh > .stack/dagmanager.yml
	@echo "Sidecar config: .stack/dagmanager.yml (Ctrl-C stops the sidecar; make stack-down stops the servers)"
	$(VENV)/bin/dagmanager --config .stack/dagmanager.yml server

clean: ## stop the stack and remove .stack/ and the virtualenv (the artefact cache stays)
	-$(STACK) down
	rm -rf .stack $(VENV)

.PHONY: crds crds-check proto proto-check help venv stack-up stack-down stack-status lint fmt unit test bench run clean
