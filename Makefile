# One entry point. Every target sets up .venv on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-wheel lint typecheck docs package services services-stop stack-bin bench bench-run clean

DEMO_STAMP := $(VENV)/.installed-demo

# Everything the tests exercise: every extra and the test tools.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[reference,grpc,zero-code]' --group test
	touch $(STAMP)

# The demo needs the package and the libraries it instruments, nothing else.
$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[instruments]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/chatter-otel demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# PostgreSQL and Redis of this checkout's own (.services/, ports 55432 and 56379, overridable
# with CHATTER_OTEL_PG_PORT and CHATTER_OTEL_REDIS_PORT); installed from Debian's packages
# when missing. `make test` starts them and stops them again.
services:
	bash scripts/services.sh start

services-stop:
	bash scripts/services.sh stop

# The real collector (exactly our components), Jaeger v2 and Prometheus, built from their Go
# modules (and Debian's package) into ~/.cache/chatter-otel, reused while the pins are the same.
stack-bin:
	bash scripts/stack-bin.sh

typecheck: $(STAMP)
	$(BIN)/mypy

# The docs site (docs/, mkdocs.yml), strict: a broken link or a missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# The published artifacts: an sdist and a wheel that build, and metadata twine accepts.
package: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build -q --sdist --wheel --outdir dist .
	$(BIN)/twine check --strict dist/*

# The built wheel on the newest set and at the lower bounds (scripts/test-wheel.sh).
test-wheel: package
	bash scripts/services.sh run bash scripts/test-wheel.sh

test: lint typecheck docs package stack-bin
	bash scripts/services.sh run sh -c '$(BIN)/python -m pytest -q -p no:cacheprovider \
	  && $(BIN)/python -m benchmarks.bench_startup && bash scripts/test-wheel.sh'

# The benchmarks, with the test services up for their run (results: docs/performance.md).
bench: $(STAMP)
	bash scripts/services.sh run $(MAKE) --no-print-directory bench-run

bench-run:
	$(BIN)/python -m benchmarks.bench_overhead
	$(BIN)/python -m benchmarks.bench_handler
	$(BIN)/python -m benchmarks.bench_sinks
	$(BIN)/python -m benchmarks.bench_ledger
	$(BIN)/python -m benchmarks.bench_startup
	$(BIN)/python -m benchmarks.bench_soak
	$(BIN)/python -m benchmarks.bench_ls
	$(BIN)/python -m benchmarks.bench_html
	bash scripts/stack-bin.sh && $(BIN)/python -m benchmarks.bench_gateway
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	$(BIN)/python -m benchmarks.bench_before_after
	$(BIN)/python -m benchmarks.bench_peers
	$(BIN)/python -m benchmarks.bench_request --parts

clean:
	bash scripts/services.sh stop
	rm -rf $(VENV) .venv-newest .venv-lowest .services build dist *.egg-info
