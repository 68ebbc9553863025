# Two entry points from a clean clone: `make run` serves the shipped model, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint format bench default-model compare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The service alone: no torch.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

# Training and tests: CPU torch first, so the extras never pull a CUDA build.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[train,dev]'
	touch $@ $(VENV)/.serve-installed

run: $(VENV)/.serve-installed
	$(BIN)/vae-serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

format: $(VENV)/.dev-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Rebuild the shipped default model from scratch (about 5.5 minutes on 2 CPU cores).
default-model: $(VENV)/.dev-installed
	$(BIN)/vae-train --config training/configs/mnist.toml --run-dir runs/default --export-dir model/default

# PCA, an autoencoder and a VAE on the shipped model's split: the table and pictures README shows, and the PCA
# and autoencoder models shipped in model/comparison/. The VAE is the shipped model, which this very recipe
# made (without --reuse-vae, vae-compare trains it again: 8 more minutes on 2 CPU cores).
compare: $(VENV)/.dev-installed
	$(BIN)/vae-compare --config training/configs/mnist.toml --out-dir runs/compare \
		--reuse-vae model/default --ship-dir model/comparison --docs-dir docs

bench: $(VENV)/.dev-installed
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
