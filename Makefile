# slimtrain — `make run` starts the service on embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Every package with its version and sha256, resolved from pyproject.toml (main + dev extra) for
# CPython 3.11 on x86_64 Linux: `make install` installs exactly this, so a fresh machine gets what
# the benchmarks measured; `make lock` regenerates it after a change to pyproject.toml.
LOCK := requirements.lock
# The CPU build of torch lies on this machine's disk (/opt/wheels); locking it keeps pip from
# pulling a multi-GB CUDA build. The Docker images for GPU clusters install a CUDA build instead.
TORCH ?= torch==2.13.0+cpu
# Where `make lock` looks besides PyPI: the local wheel folder (torch's CPU build) and this
# machine's package mirrors. The lock records them, so pip finds torch on a machine of this kind.
LOCK_SOURCES ?= --find-links /opt/wheels \
	--extra-index-url file:///opt/pypi/simple --extra-index-url file:///opt/pypi-more/simple
# uv resolves and hashes in seconds where pip-compile took 11 minutes here; it runs from its
# own small venv, not from the project's.
LOCK_TOOLS ?= .venv-lock
UV_VERSION ?= 0.13.9
# The slowest tests are listed at the end of every run: CI is held to 45 of its 90 minutes.
# Serial by default. `make test PYTEST_WORKERS=2` runs two pytest-xdist workers (tests/conftest.py
# keeps every test on the session's Ray head in one worker and each other module in one). On this
# 2-CPU machine it is slower than serial: two trials (load 15-39, then 6-17) were stopped at 28% and
# 27% after 47 and 23 minutes, while the unit tests alone (69%) take ~12 serially. Tests are CPU-bound
# (torch, Ray workers), so two pytest processes only share the same two cores.
PYTEST_WORKERS ?= 0
PYTEST_ARGS ?= --durations=30 -n $(PYTEST_WORKERS) --dist loadgroup

.PHONY: install lock run test test-deps test-unit test-integration lint format bench clean

install: $(STAMP)

# The stamp follows the lock, not pyproject.toml: a dependency added to pyproject.toml reaches the
# venv through `make lock`. `pip check` then names any requirement the lock lacks.
$(STAMP): $(LOCK) pyproject.toml
	@if [ pyproject.toml -nt $(LOCK) ]; then \
	  echo "note: pyproject.toml is newer than $(LOCK); if dependencies changed, run make lock"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

# --index-strategy unsafe-best-match: the newest version on any source wins, as with pip (uv's
# default takes whatever the first source holds). The torch pin goes in as a constraint, so the
# lock keeps the CPU build whatever range pyproject.toml allows; it comes through a pipe, so sed
# names where it is set instead of /dev/fd/N. Hashes are those of the wheels pip can pick on
# CPython 3.11, x86_64, glibc 2.36 (this machine's Debian 12), the platform the lock is for.
lock:
	[ -x $(LOCK_TOOLS)/bin/uv ] || { $(PYTHON) -m venv $(LOCK_TOOLS) && \
	  $(LOCK_TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"; }
	$(LOCK_TOOLS)/bin/uv pip compile --quiet pyproject.toml --extra dev --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_36 \
	  --index-strategy unsafe-best-match $(LOCK_SOURCES) --emit-find-links --emit-index-url \
	  --custom-compile-command "make lock" -c <(echo "$(TORCH)") -o $(LOCK)
	sed -i 's|-c /dev/fd/[0-9]*|TORCH in the Makefile (CPU build)|' $(LOCK)

run: install
	$(VENV)/bin/slimtrain serve

# PostgreSQL, Chromium and a font for the database and browser tests: installed with apt when
# missing (sudo when not root), nothing done when present; says what to install if it cannot.
test-deps:
	tests/system-deps.sh

test: install test-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests

test-unit: install
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/unit

test-integration: install test-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS) tests/integration

# The deployment test (deploy/README.md): builds the images, brings up docker-compose.yml with
# deploy/compose.test.yaml (API, Ray head, two CPU Ray worker containers, PostgreSQL and S3
# stand-ins) and runs a 2-worker DDP job across the worker containers through the API's port.
# Needs docker or podman (../shared/tools/container-engine.sh prepares podman on this machine).
.PHONY: test-deploy
test-deploy: install
	deploy/test-deploy.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) $(LOCK_TOOLS) slimtrain-data .pytest_cache .ruff_cache test-artifacts
