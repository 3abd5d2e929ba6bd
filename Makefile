# The README explains every target. Each one builds the virtualenv it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed pinned, before the `train` extra (which then finds it in place). On Linux, PyPI's torch
# wheel is the CUDA build (with several GB of NVIDIA libraries): TORCH_INDEX_URL names another index, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build (the README's "Training" says when).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# Where `make train` writes the exported default model.
MODEL_DIR ?= models/default

.PHONY: serve test lint train train-quality soak clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The service alone: no torch.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Training and development tools on top.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $@

serve: $(VENV)/.serve-installed
	VAE_MODEL_DIR=$${VAE_MODEL_DIR:-models/default} \
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

train: $(VENV)/.dev-installed
	$(BIN)/python -m training train --out runs/default
	$(BIN)/python -m training export --checkpoint runs/default/best.pt --out $(MODEL_DIR)

# The served model under a mix of every endpoint and bad requests, 64 connections, loopback only;
# bounded by time and by a request budget. Not part of `make test`.
SOAK_SECONDS ?= 600
SOAK_REQUESTS ?= 2000000
soak: $(VENV)/.dev-installed
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS) --requests $(SOAK_REQUESTS)

# The default recipe against the pytorch/examples VAE recipe, same data and epochs.
train-quality: $(VENV)/.dev-installed
	$(BIN)/python bench/train_quality.py --json bench/results/train-quality-$$(date -u +%Y-%m-%d).json

# Requests per second and latency of the served model against its own /health and a naive peer, batching
# on and off; writes bench/results/<date>-<time>.json and .md. Needs wrk (apt-get install wrk).
bench: $(VENV)/.dev-installed
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
