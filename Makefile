# `make demo` and `make test` create the environment on first use.
# TORCH is the torch requirement installed first; 2.13.0 is a CPU build on the project's machines
# and the default CUDA build from PyPI elsewhere. Override: make demo TORCH='torch==2.5.1'.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/sdxl-lora: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/sdxl-lora

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/dvc metrics show metrics/evaluate/metrics.json metrics/train/metrics.json

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf data models metrics/train metrics/evaluate dvc_plots
