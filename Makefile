# One entry point. Every target sets up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck services bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chatter-otel demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# PostgreSQL and Redis on loopback (installed from Debian's packages when missing).
services:
	bash scripts/services.sh

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck services
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP) services
	$(BIN)/python -m benchmarks.bench_overhead
	$(BIN)/python -m benchmarks.bench_handler
	$(BIN)/python -m benchmarks.bench_sinks
	$(BIN)/python -m benchmarks.bench_ledger
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	$(BIN)/python -m benchmarks.bench_before_after

clean:
	rm -rf $(VENV) build *.egg-info
