"""``chatter-otel ls`` over a local store of 1,000,000 spans: does the index answer at once?

Fills a store with ``--spans`` spans (default 1,000,000: traces of 8 spans over a week, one in
50 failed, 5 models, 10,000 conversations), then times, best of ``--repeat``, in-process
(``LocalTraceStore.recent``, what the command runs) and as the command a person types
(``python -m chatter_otel ls``, start-up included): the newest 20, ``--errors``,
``--conversation``, ``--model``, ``--since 1h``. Exit 1 when the in-process plain listing takes
over ``--max-s`` (default 0.3 s).

    python -m benchmarks.bench_ls [--spans N] [--repeat K] [--max-s S] [--store PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chatter_otel import LocalTraceStore
from chatter_otel.traces.spans import SpanRecord

MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet", "llama-3", "mistral-large")


def fill(store: LocalTraceStore, spans: int) -> None:
    """``spans`` spans in traces of 8 (a workflow, 2 nodes, 2 chats, a tool...), a week long."""
    now = time.time_ns()
    week = 7 * 86_400 * 10**9
    traces = spans // 8
    batch: list[SpanRecord] = []
    for t in range(traces):
        tid = f"{t:032x}"
        start = now - week + t * (week // traces)
        failed = t % 50 == 0
        model = MODELS[t % len(MODELS)]
        conv = f"conv-{t % 10_000}"
        for s in range(8):
            attrs: dict[str, Any] = {"gen_ai.conversation.id": conv,
                                     "chatter.correlation.id": f"req-{t}"}  # fmt: skip
            if s in (2, 5):
                attrs |= {"gen_ai.operation.name": "chat", "gen_ai.request.model": model,
                          "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20,
                          "gen_ai.usage.cost.amount": 0.00003}  # fmt: skip
            batch.append(SpanRecord(
                trace_id=tid, span_id=f"{t:08x}{s:08x}", parent_id=None if s == 0 else
                f"{t:08x}{0:08x}", name="invoke_workflow chat" if s == 0 else f"span {s}",
                start_ns=start + s * 1000, end_ns=start + 10_000_000,
                status="ERROR" if failed and s == 5 else "UNSET", attributes=attrs,
            ))  # fmt: skip
        if len(batch) >= 50_000:
            store.write(batch)
            batch.clear()
    if batch:
        store.write(batch)


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-s", type=float, default=0.3)
    parser.add_argument("--store", type=Path, default=None, help="keep the filled store here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = args.store or Path(folder) / "traces.db"
        store = LocalTraceStore(path, max_spans=args.spans + 1, max_age_s=30 * 86_400)
        if not path.exists() or store.last_rowid() == 0:
            t0 = time.perf_counter()
            fill(store, args.spans)
            print(f"filled {args.spans} spans in {time.perf_counter() - t0:.0f} s")
        cases = {
            "ls": {},
            "ls --errors": {"errors": True},
            "ls --conversation conv-7": {"conversation_id": "conv-7"},
            "ls --model gpt-4o": {"model": "gpt-4o"},
            "ls --since 1h": {"since_ns": time.time_ns() - 3600 * 10**9},
        }
        print(f"{'query':<28} {'in-process s':>12} {'command s':>10}")
        plain = 0.0
        for name, kw in cases.items():
            took = best(lambda kw=kw: store.recent(limit=20, **kw), args.repeat)
            argv = [sys.executable, "-m", "chatter_otel", *name.split(), "--store", str(path)]
            cmd = best(lambda argv=argv: subprocess.run(argv, capture_output=True, check=False),
                       max(1, args.repeat // 2))  # fmt: skip
            plain = plain or took
            print(f"{name:<28} {took:>12.4f} {cmd:>10.3f}", flush=True)
        bare = best(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 3)
        print(f"(a bare interpreter starts in {bare:.3f} s)")
        store.close()
    raise SystemExit(1 if plain > args.max_s else 0)


if __name__ == "__main__":
    main()
