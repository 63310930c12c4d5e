# webpurse — `make demo` runs the system, `make test` passes the tests; both set up .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck unit bench clean venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# pyscard builds from source (needs swig, gcc, libpcsclite-dev); without it the
	@# PC/SC tests skip outside CI and fail inside it.
	$(BIN)/python -m pip install -q 'pyscard>=2.0.9' || echo "warning: pyscard not installed: install swig, gcc, python3-dev, libpcsclite-dev"
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/webpurse demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
