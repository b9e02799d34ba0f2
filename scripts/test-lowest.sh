#!/usr/bin/env bash
# The built wheel, installed at the lower bounds of its dependency ranges (constraints-lowest.txt)
# in a fresh venv, passes the tests that need no extra; and, with the [reference] extras at their
# lower bounds (SQLAlchemy 2.0), the usage ledger's. `make test` runs the rest on the newest set
# (constraints.txt). The tests run from a copy, so they import the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="$root/.venv-lowest"
rm -rf "$venv"
"${PY:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
wheel="$(ls "$root"/dist/chatter_otel-*.whl)"
"$venv/bin/python" -m pip install -q -c constraints-lowest.txt "$wheel" pytest pytest-asyncio
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r tests pyproject.toml "$work/"
cd "$work"
no_extras=(test_content test_cost test_demo test_errors_and_control_flow test_hostile
  test_instrumentor test_processors test_sources test_spans test_store_cli test_usage
  test_workflow_api)
files=()
for name in "${no_extras[@]}"; do files+=("tests/$name.py"); done
echo "lowest set, no extras:"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}"
"$venv/bin/python" -m pip install -q -c "$root/constraints-lowest.txt" "$wheel[reference]"
echo "lowest set, the ledger on SQLAlchemy $("$venv/bin/python" -c 'import sqlalchemy; print(sqlalchemy.__version__)'):"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_persistence.py tests/test_spool.py
