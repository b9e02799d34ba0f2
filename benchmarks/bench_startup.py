"""Start-up: the CLI starts like a small tool, and ``configure()`` stays light.

Measured in one process run, each number the best of ``--repeat`` fresh interpreters:

* ``chatter-otel --version`` against a bare interpreter start (``python -c pass``): a ratio,
  which must stay at most ``--max-ratio`` (5);
* ``--version``, ``find`` and ``trace`` (on an empty local store) load no module of LangChain,
  LangGraph, LangSmith or a provider SDK (``-X importtime``);
* ``configure()`` in an app that imported LangGraph: its own time (at most ``--max-configure-s``,
  0.3 s) and no provider SDK (openai, anthropic) imported by it.

As installed: pip compiles a package's bytecode when it installs it, so each command runs once
unmeasured first, with ``PYTHONDONTWRITEBYTECODE`` left out of its environment, which writes
the checkout's bytecode (a machine that sets it would otherwise measure Python compiling our
sources on every start, which no installed copy does).

Exits 1 when a bound is not met. ``make test`` runs it.

    python -m benchmarks.bench_startup [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("langchain", "langgraph", "langsmith", "openai", "anthropic")
CONFIGURE = """
import json, sys, time
import langgraph.graph, langchain_core.messages  # the app's own imports, before configure()
before = set(sys.modules)
from opentelemetry.sdk.trace import TracerProvider
import chatter_otel
start = time.perf_counter()
chatter_otel.configure(tracer_provider=TracerProvider(), exporter="none", set_global=False,
                       metrics_exporter="none")
took = time.perf_counter() - start
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("openai", "anthropic"))
print(json.dumps({"took": took, "provider_sdks": new}))
"""


# As installed: bytecode written (see the module's docstring).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _best(argv: list[str], repeat: int) -> float:
    subprocess.run(argv, check=True, capture_output=True, env=ENV)  # writes the bytecode
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=ENV)
        best = min(best, time.perf_counter() - start)
    return best


def _heavy_imports(argv: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "chatter_otel", *argv],
                         capture_output=True, text=True, check=False, env=ENV)  # fmt: skip
    names = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
             if line.startswith("import time:")]  # fmt: skip
    return sorted({n for n in names if n.split(".")[0].startswith(HEAVY)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--max-ratio", type=float, default=5.0)
    parser.add_argument("--max-configure-s", type=float, default=0.3)
    args = parser.parse_args()
    failures: list[str] = []
    bare = _best([sys.executable, "-c", "pass"], args.repeat)
    cli = _best([sys.executable, "-m", "chatter_otel", "--version"], args.repeat)
    ratio = cli / bare
    print(f"bare interpreter        {bare * 1000:7.1f} ms")
    print(f"chatter-otel --version  {cli * 1000:7.1f} ms  ratio {ratio:.2f} "
          f"(at most {args.max_ratio:g})")  # fmt: skip
    if ratio > args.max_ratio:
        failures.append(f"--version takes {ratio:.2f}x a bare interpreter")
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "traces.db")
        commands = (["--version"], ["find", "--correlation-id", "x", "--store", store],
                    ["trace", "0" * 32, "--store", store], ["ls", "--store", store])  # fmt: skip
        for command in commands:
            heavy = _heavy_imports(command)
            print(f"chatter-otel {command[0]:<9} loads {len(heavy)} heavy module(s)")
            if heavy:
                failures.append(f"{command[0]} imports {heavy[:5]}")
    took: list[float] = []
    imported: set[str] = set()
    # One more than measured: the first writes the bytecode; the best of the rest counts (noise
    # on a shared machine only adds).
    for run in range(args.repeat + 1):
        out = subprocess.run([sys.executable, "-c", CONFIGURE], capture_output=True, text=True,
                             check=True, env=ENV)  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if run:
            took.append(result["took"])
        imported.update(result["provider_sdks"])
    print(f"configure()             {min(took) * 1000:7.1f} ms of its own "
          f"(at most {args.max_configure_s * 1000:.0f} ms), no provider SDK imported")  # fmt: skip
    if imported:
        failures.append(f"configure() imported {sorted(imported)}")
    if min(took) > args.max_configure_s:
        failures.append(f"configure() took {min(took):.3f} s")
    for failure in failures:
        print(f"FAILED: {failure}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
