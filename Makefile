# webpurse — `make demo` runs the system, `make test` passes the tests; both set up .venv.
# Every Python package comes from uv.lock (`uv sync --frozen`); `make lock` refreshes it on
# purpose. uv itself is installed by hash from requirements/uv.txt into .tools/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
UV := $(TOOLS)/bin/uv
STAMP := $(VENV)/.installed
# uv uses the machine's interpreter and never downloads one.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Installed packages come with their bytecode: every `webpurse` process the tests start
# (the fault matrix starts dozens) imports from .pyc instead of compiling FastAPI,
# SQLAlchemy and the rest again, also where PYTHONDONTWRITEBYTECODE is set.
export UV_COMPILE_BYTECODE := 1

.PHONY: test demo demo-cluster lint typecheck lock-check lock lock-tools bench clean venv

$(UV): requirements/uv.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.txt
	@touch $(UV)

# Fails with a clear message when pyproject.toml and uv.lock disagree.
lock-check: $(UV)
	@$(UV) lock --check -q || { echo "error: uv.lock does not match pyproject.toml: run '$(UV) lock' (only what changed) and commit uv.lock" >&2; exit 1; }

# pyscard (the pcsc extra) is in the lock but builds from source (swig, gcc, libpcsclite-dev).
# Without those the environment is synced without it and the PC/SC tests skip outside CI
# and fail inside it (CI=true installs the build tools first, so there it must build).
$(STAMP): pyproject.toml uv.lock $(UV) Makefile
	@$(MAKE) --no-print-directory lock-check
	@if $(UV) sync --frozen -q --extra dev --extra pcsc; then :; \
	elif [ "$${CI:-}" = "true" ]; then echo "error: pyscard did not build from uv.lock" >&2; exit 1; \
	else echo "warning: pyscard not installed (install swig, gcc, python3-dev, libpcsclite-dev and run 'make venv' again)" >&2; \
	  $(UV) sync --frozen -q --extra dev; fi
	@touch $(STAMP)

venv: $(STAMP)

# Resolve the newest versions pyproject.toml allows and write uv.lock; then run `make test`.
lock: $(UV)
	$(UV) lock --upgrade

lock-tools: $(UV)
	$(UV) pip compile requirements/uv.in --generate-hashes --no-header -q -o requirements/uv.txt

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: lock-check $(STAMP) lint typecheck
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/webpurse demo

# 2 shop + 2 settlement processes behind HAProxy (TLS), on PostgreSQL and Redis at
# 127.0.0.1 (WEBPURSE_CLUSTER_DATABASE_URL, WEBPURSE_CLUSTER_REDIS_URL); needs haproxy.
demo-cluster: $(STAMP)
	$(BIN)/webpurse demo --cluster

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache

# The terminal agent alone (docs/agent.md): dist/webpurse_agent-VERSION-py3-none-any.whl, its
# hash-pinned requirements (versions from uv.lock) and dist/SHA256SUMS for both.
.PHONY: agent
agent: $(UV)
	$(TOOLS)/bin/python agent-dist/build.py --uv $(UV)
