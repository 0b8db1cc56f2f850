# slimtrain — `make run` starts the service on embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; pinning it keeps pip from pulling a
# multi-GB CUDA build. The Docker images for GPU clusters install a CUDA build instead.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install run test test-unit test-integration lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/slimtrain serve

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

test-unit: install
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/unit

test-integration: install
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/integration

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) slimtrain-data .pytest_cache .ruff_cache test-artifacts
