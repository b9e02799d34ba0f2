#!/usr/bin/env bash
# The built wheel, installed in a fresh venv with the newest set (constraints.txt) and with the
# lower bounds of its dependency ranges (constraints-lowest.txt), passes the tests that need no
# extra but the instrumented libraries ([instruments]); and, with the [reference] extras at
# their lower bounds (SQLAlchemy 2.0), the usage ledger's. The tests run from a copy, so they import the installed wheel, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
wheel="$(ls "$root"/dist/chatter_otel-*.whl)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r tests pyproject.toml "$work/"
no_extras=(test_content test_cost test_demo test_errors_and_control_flow test_hostile
  test_instrumentor test_interrupts test_processors test_semconv_modes test_sources test_spans
  test_store_cli test_usage test_workflow_api)
files=()
for name in "${no_extras[@]}"; do files+=("tests/$name.py"); done

for set in newest lowest; do
  constraints="$root/constraints.txt"
  [ "$set" = lowest ] && constraints="$root/constraints-lowest.txt"
  venv="$root/.venv-$set"
  rm -rf "$venv"
  "${PY:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # the test tools the listed tests use (cryptography: a self-signed certificate for https)
  "$venv/bin/python" -m pip install -q -c "$constraints" "$wheel[instruments]" pytest pytest-asyncio \
    cryptography
  echo "wheel, $set set ($("$venv/bin/python" -c 'import opentelemetry.sdk.version as v; print("OpenTelemetry", v.__version__)')), no extras:"
  (cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "${files[@]}")
done

# util-genai's framework-over-provider protocol on its newest release (the dev venv pins
# 1.1b0, the newest openai-v2 2.4b0 imports), with a real ChatOpenAI.
venv="$root/.venv-newest"
"$venv/bin/python" -m pip install -q -c <(grep -v '^opentelemetry-util-genai==' "$root/constraints.txt") \
  "opentelemetry-util-genai >= 1.2b0" langchain-openai
echo "wheel, newest set, util-genai $("$venv/bin/python" -c 'from importlib.metadata import version; print(version("opentelemetry-util-genai"))') beside ours:"
(cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/genai_protocol_check.py)

venv="$root/.venv-lowest"
"$venv/bin/python" -m pip install -q -c "$root/constraints-lowest.txt" "$wheel[reference]"
echo "wheel, lowest set, the ledger on SQLAlchemy $("$venv/bin/python" -c 'import sqlalchemy; print(sqlalchemy.__version__)'):"
(cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_persistence.py \
  tests/test_ledger_one_statement.py \
  tests/test_spool.py)
