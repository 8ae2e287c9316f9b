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

.PHONY: install run test test-unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_PIN)" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ray-router run --out runs/main

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: $(STAMP)
	$(BIN)/python bench/replay_speed.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
