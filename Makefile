# MetricSearch: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.PHONY: help install train test test-all check-data prepare-data lint format clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install pinned dependencies (idempotent; fast when nothing changed)

train: install ## Train the default model (resnet10t, triplet, built-in synthetic data) and print the metrics table
	$(PY) train.py $(ARGS)

test: install ## Run the test suite (slow tests excluded)
	$(PY) -m pytest -m "not slow and not gpu" $(ARGS)

test-all: install ## Run every test that can run on this machine, slow ones included
	$(PY) -m pytest -m "not gpu" $(ARGS)

check-data: install ## Check a dataset copy: make check-data ARGS="data=cub data.root=PATH"
	$(PY) scripts/check_data.py $(ARGS)

prepare-data: install ## Download and unpack a dataset: make prepare-data ARGS="data=cub"
	$(PY) scripts/prepare_data.py $(ARGS)

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check src tests scripts train.py
	$(VENV)/bin/ruff format --check src tests scripts train.py

format: install ## Format the code with ruff
	$(VENV)/bin/ruff check --fix src tests scripts train.py
	$(VENV)/bin/ruff format src tests scripts train.py

clean: ## Remove run outputs and caches (keeps .venv and data/)
	rm -rf outputs multirun .pytest_cache .ruff_cache lightning_logs
