# Two commands do all set-up: `make run` (the offline demo server) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes through pip (it finds the CPU wheel on this disk, and TORCH_INDEX applies to it alone); the rest
# through uv, with torch already installed: pip's resolver took about 3 of CI's 14 minutes, uv takes under 1.
UV = $(BIN)/uv pip install -q --python $(BIN)/python
# torch is installed once, at the version constraints.txt pins (the runtime requirement stays a range in
# pyproject.toml). PyPI's Linux torch wheel bundles CUDA (several GB); for the CPU-only wheel (~200 MB) run
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_SPEC ?= torch==2.13.0
# The suite runs in TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so its fixtures are built
# once), each single-threaded: most tests wait on a server or a subprocess. On 2 cores: 604 s against 845 s serial.
TEST_WORKERS ?= 2
TORCH_INDEX ?=

.PHONY: run test lint typecheck bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt uv
	$(UV) -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml constraints.txt
	$(UV) -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(BIN)/lokr-serve demo $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check lokr service tests bench scripts
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check lokr service tests bench scripts
	$(BIN)/ruff format --check lokr service tests bench scripts

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/layers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
