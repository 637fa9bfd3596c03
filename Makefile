# The two commands a new user runs: `make demo` (the whole pipeline on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_HOME ?= $(HOME)/.cache/vim/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: demo test test-slow lint install clean-outputs

install: $(STAMP)

# Pinned set: torch/torchvision come from the local wheel store, the rest resolves with no backtracking.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[pipeline,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dvc repro
	@$(BIN)/python -m flows.summary

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check vim_core flows tests benchmarks scripts
	$(BIN)/ruff format --check vim_core flows tests benchmarks scripts
