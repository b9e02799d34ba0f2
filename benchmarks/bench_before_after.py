"""Before/after in one run, in instructions: this tree against an earlier commit of it.

Wall time on this 2-vCPU VM drifts by ±15% from one minute to the next; instruction counts
under ``valgrind --tool=callgrind`` are repeatable (same binary, inputs and environment; the
hash seed fixed). Each configuration runs in its own process, twice: with ``--short`` and with
``--short + --runs`` graph runs; the difference divided by ``--runs`` is the instructions per
run, imports and start-up cancelled out.

Configurations, for each tree (``before``: ``git archive`` of ``--before``; ``after``: this
checkout), the reference workflow (2 LLM calls, 1 tool call) with ``invoke``:

* ``bare``: no instrumentation (run once: no code of ours);
* ``sampled``: ``LangGraphInstrumentor`` on an SDK provider whose sampler keeps every trace,
  spans through ``BatchSpanProcessor`` to a dropping exporter;
* ``unsampled``: the same with ``ALWAYS_OFF``. Before this change our spans were not recorded
  then (and nothing was accounted); after it they are ``RECORD_ONLY``: this row is what always
  recording costs per unsampled run.

    python -m benchmarks.bench_before_after [--before REF] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "83b1421"  # main before "one source of truth" (typed records, RECORD_ONLY)

WORKLOAD = r"""
import sys
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
import chatter_otel
from chatter_otel import LangGraphInstrumentor
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

class Drop(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS

mode, runs, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert chatter_otel.__file__.startswith(where), (chatter_otel.__file__, where)
if mode != "bare":
    provider = TracerProvider(sampler=ALWAYS_ON if mode == "sampled" else ALWAYS_OFF)
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
    LangGraphInstrumentor().instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
graph = build_chat_graph()
question = {"messages": [HumanMessage("What is the weather in Paris?")]}
for _ in range(3):  # warm-up: first-call caches, genai-prices' snapshot
    graph.invoke(question)
for _ in range(runs):
    graph.invoke(question)
"""


def _instructions(tree: Path, mode: str, runs: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-P", "-c", WORKLOAD, mode, str(runs), str(tree)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(proc.stderr[-2000:])
    return int(found.group(1))


def per_run(tree: Path, mode: str, short: int, runs: int) -> float:
    return (_instructions(tree, mode, short + runs) - _instructions(tree, mode, short)) / runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default=BASE)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp)
        archive = subprocess.run(["git", "archive", args.before, "chatter_otel"], cwd=ROOT,
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        bare = per_run(ROOT, "bare", args.short, args.runs)
        res: dict[str, float] = {"bare": bare}
        for name, tree in (("before", before), ("after", ROOT)):
            for mode in ("sampled", "unsampled"):
                res[f"{name}_{mode}"] = per_run(tree, mode, args.short, args.runs)
    print(f"instructions per invoke run (callgrind; {args.runs} runs; before = {args.before})")
    print(f"{'configuration':<20} {'instr/run':>12} {'added vs bare':>14} {'ratio':>6}")
    for key, value in res.items():
        print(f"{key:<20} {value:>12,.0f} {value - bare:>14,.0f} {value / bare:>6.3f}")
    grew = res["after_sampled"] - res["before_sampled"]
    record_only = res["after_unsampled"] - res["before_unsampled"]
    print(f"added cost grew by {grew:,.0f} instr/run (sampled, after - before)")
    print(f"RECORD_ONLY costs {record_only:,.0f} instr/run (unsampled, after - before)")
    print(f"within the RECORD_ONLY cost: {grew <= record_only}")
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "runs": args.runs}, indent=2))


if __name__ == "__main__":
    main()
