# sse-blueprint: `make run` serves the reference app, `make test` runs the whole suite.
# Both work on a fresh machine: they create .venv and install what they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUN_STAMP := $(VENV)/.run-stamp

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast bench lint typecheck system-deps clean

# `make run` installs only what serving needs (the library and the reference app's Redis and
# PostgreSQL drivers); `make test` adds the development tools.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[redis,postgres]'
	touch $@

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Serves the reference app on 127.0.0.1:8000; SSE_BIND=0.0.0.0:9000, SSE_WORKERS=4 (with
# FLASK_SSE_REDIS_URL) and SSE_ACCESS_LOG=1 change it (see gunicorn.conf.py).
run: $(RUN_STAMP)
	$(BIN)/gunicorn -c gunicorn.conf.py app:app

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

system-deps:
	bash scripts/system-deps.sh

test: lint typecheck system-deps
	$(BIN)/python -m pytest

# The fast tier: the engine with in-memory parts and the views through Flask's test client; no
# server, no Redis, no browser (about 20 seconds). `make test` runs it too, with the rest.
FAST_TESTS := tests/test_engine.py tests/test_turn_api.py tests/test_persistence.py \
	tests/test_batch.py tests/test_wire.py tests/test_config.py tests/test_views.py \
	tests/test_relay_units.py tests/test_aisdk_units.py tests/test_mirror.py \
	tests/test_log.py tests/test_workers.py tests/test_held_units.py tests/test_outbox.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(FAST_TESTS)

# Benchmarks against peers (not part of `make test`): about 10 minutes, loopback only.
# Writes benchmarks/results/results.md, results.json and fanout.png, and copies the table into
# the README.
bench: $(STAMP) system-deps
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.readme_table

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
