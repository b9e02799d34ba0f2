# One entry point. Every target sets up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-wheel lint typecheck package services stack-bin bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[app]' --group test
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/chatter-otel demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# PostgreSQL and Redis on loopback (installed from Debian's packages when missing).
services:
	bash scripts/services.sh

# The real collector (exactly our components), Jaeger v2 and Prometheus, built from their Go
# modules (and Debian's package) into ~/.cache/chatter-otel, reused while the pins are the same.
stack-bin:
	bash scripts/stack-bin.sh

typecheck: $(STAMP)
	$(BIN)/mypy

# The published artifacts: an sdist and a wheel that build, and metadata twine accepts.
package: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build -q --sdist --wheel --outdir dist .
	$(BIN)/twine check --strict dist/*

# The built wheel on the newest set and at the lower bounds (scripts/test-wheel.sh).
test-wheel: package services
	bash scripts/test-wheel.sh

test: lint typecheck package services stack-bin
	$(BIN)/python -m pytest -q -p no:cacheprovider
	bash scripts/test-wheel.sh

bench: $(STAMP) services
	$(BIN)/python -m benchmarks.bench_overhead
	$(BIN)/python -m benchmarks.bench_handler
	$(BIN)/python -m benchmarks.bench_sinks
	$(BIN)/python -m benchmarks.bench_ledger
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	$(BIN)/python -m benchmarks.bench_before_after

clean:
	rm -rf $(VENV) .venv-newest .venv-lowest build dist *.egg-info
