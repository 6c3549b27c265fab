# MetricSearch: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true
SUDO := $(shell test "$$(id -u)" -eq 0 || echo sudo)

.PHONY: help install train test test-all check-data prepare-data chromium demo serve load-test bench-search bench-postprocess benchmark device-wheels lint format clean reproduce compare docs docs-serve

# Where `make reproduce` and `make compare` write their runs, studies and tables: by default a git-ignored folder
# (outputs/reproduce, outputs/compare), so a trial run never touches the committed results. The committed results are
# refreshed only when named: `make reproduce RESULTS_DIR=results`, `make compare RESULTS_DIR=results/compare`.
RESULTS_DIR ?=
# `make reproduce`: DATASETS adds real datasets (cub,cars196,sop; only those on disk) to the built-in synthetic
# data; LOSSES, SEEDS and EPOCHS replace the grid's defaults; EXTRA is passed to every run as Hydra overrides.
DATASETS ?=
LOSSES ?=
SEEDS ?=
EPOCHS ?=
EXTRA ?=
# `make compare` (the fair comparison, conf/compare/) takes the same five, plus the protocol's size: TRIALS per loss,
# FOLDS of the training classes, WORKERS (trials at once), IMAGE_SIZE, INCLUDE_DEFAULT (true: each study's first trial
# is the loss's default setting); left empty, conf/compare/protocol.yaml decides.
TRIALS ?=
FOLDS ?=
WORKERS ?=
IMAGE_SIZE ?=
INCLUDE_DEFAULT ?=
# `make serve` / `make load-test`: the index folder to serve (the demo's by default; `make demo
# ARGS=index.backend=milvus` builds it in Milvus Lite instead of faiss).
INDEX ?= outputs/demo/index

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

chromium: ## Install Debian's Chromium for the browser test (apt-get; needs root or sudo)
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: install chromium ## Run the test suite (slow tests excluded; the browser test included)
	$(PY) -m pytest -m "not slow and not gpu" $(ARGS)

test-all: install chromium ## Run every test that can run on this machine, slow ones included
	$(PY) -m pytest -m "not gpu" $(ARGS)

reproduce: install ## Loss x dataset x seed grid into outputs/reproduce/ (resumable; RESULTS_DIR=results refreshes the committed tables; DATASETS=cub,cars196,sop LOSSES= SEEDS= EPOCHS= EXTRA= WEIGHTS=backbone=FILE,...)
	$(PY) scripts/reproduce.py --datasets "synthetic,$(DATASETS)" $(if $(LOSSES),--losses "$(LOSSES)") \
		$(if $(SEEDS),--seeds "$(SEEDS)") $(if $(EPOCHS),--epochs $(EPOCHS)) --extra "$(EXTRA)" \
		$(if $(WEIGHTS),--weights "$(WEIGHTS)") --results-dir "$(or $(RESULTS_DIR),outputs/reproduce)"

compare: install ## Fair loss comparison into outputs/compare/ (resumable; RESULTS_DIR=results/compare refreshes the committed one; DATASETS= LOSSES= TRIALS= FOLDS= SEEDS= EPOCHS= IMAGE_SIZE= WORKERS= INCLUDE_DEFAULT= EXTRA=)
	$(PY) scripts/compare.py --datasets "synthetic,$(DATASETS)" $(if $(LOSSES),--losses "$(LOSSES)") \
		$(if $(TRIALS),--trials $(TRIALS)) $(if $(FOLDS),--folds $(FOLDS)) $(if $(SEEDS),--seeds "$(SEEDS)") \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(INCLUDE_DEFAULT),--include-default=$(INCLUDE_DEFAULT)) \
		--extra "$(EXTRA)" --results-dir "$(or $(RESULTS_DIR),outputs/compare)"

demo: install ## Train (or reuse) a short default run, index its unseen test classes, search, write outputs/demo/search_grid.png (ARGS=index.backend=milvus: in Milvus Lite)
	$(PY) scripts/demo.py $(ARGS)

serve: install ## Serve the demo index's search page at http://127.0.0.1:8000/
	$(PY) scripts/serve.py index=$(INDEX) $(ARGS)

load-test: install ## Load-test the demo index's search server on loopback (16 clients x 20 s; ARGS="clients=64 duration=60")
	$(PY) scripts/load_test.py index=$(INDEX) $(ARGS)

bench-search: install ## Benchmark faiss exact/IVF/HNSW and Milvus Lite on a 100k synthetic gallery
	$(PY) scripts/bench_search.py $(ARGS)

bench-postprocess: install ## Re-ranking and query expansion measured by the exact metrics (ARGS="embeddings=RUN/test_embeddings.npz out=...")
	$(PY) scripts/bench_postprocess.py $(ARGS)

benchmark: install ## Speed and scale report into results/benchmark/ (training, Lightning overhead, evaluation; GPU parts with CUDA)
	$(PY) scripts/benchmark.py $(ARGS)

# The GPU machine has PyTorch, Lightning, timm, torchmetrics and numba but no internet: these wheels travel with
# the working tree (see scripts/device_benchmark.sh).
DEVICE_WHEELS = faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0
device-wheels: install ## Download the Python 3.12 wheels the GPU machine lacks into .whl/ (for scripts/device_benchmark.sh)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(DEVICE_WHEELS)

check-data: install ## Check a dataset copy: make check-data ARGS="data=cub data.root=PATH"
	$(PY) scripts/check_data.py $(ARGS)

prepare-data: install ## Download and unpack a dataset: make prepare-data ARGS="data=cub"
	$(PY) scripts/prepare_data.py $(ARGS)

docs: install ## Write the results tables from results/ into README.md and docs/, then build the site strictly into site/
	$(PY) scripts/docs_tables.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: docs ## Serve the built site at http://127.0.0.1:8000/ (make docs first rebuilds it)
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory site

lint: install ## Check style with ruff
	$(VENV)/bin/ruff check src tests scripts train.py
	$(VENV)/bin/ruff format --check src tests scripts train.py

format: install ## Format the code with ruff
	$(VENV)/bin/ruff check --fix src tests scripts train.py
	$(VENV)/bin/ruff format src tests scripts train.py

clean: ## Remove run outputs and caches (keeps .venv and data/)
	rm -rf outputs multirun .pytest_cache .ruff_cache lightning_logs site
