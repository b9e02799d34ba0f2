"""Instrumentation overhead against a bare LangGraph run, measured in one process run.

The graph is the reference workflow (2 LLM calls, 1 tool call, the local chat model), run with
``invoke`` and ``ainvoke`` in five modes:

* ``bare``: no instrumentation, no callback handler;
* ``noop_handler``: one do-nothing inline LangChain callback handler, the cost LangChain itself
  adds as soon as any handler listens (a floor no callback-based instrumentation can go under);
* ``spans_no_export``: a handler that only opens and closes the same 7 spans, with a tracer
  provider that has no span processor (the SDK's span objects alone);
* ``min_spans``: the same, through the SDK's ``BatchSpanProcessor`` (the floor for this span
  tree with the OpenTelemetry SDK as every exporting app runs it);
* ``chatter_otel``: ``LangGraphInstrumentor`` with pricing, roll-ups and ids.

Spans go through ``BatchSpanProcessor`` to an exporter that drops them: export runs off the
request path. Rounds are short and the modes run in a new random order in each (seeded), so
that this VM's drift in speed hits all alike and no mode always follows the same other one.
Reported per mode: the median over rounds of the round's mean µs per run, and the added µs
against ``bare`` as the mean of the per-round differences with its standard error (the rounds
pair up the modes). It also checks that async runs make no thread hop (the handler must run on
the event loop's thread).

    python -m benchmarks.bench_overhead [--runs N] [--rounds R] [--seed S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from chatter_otel import LangGraphInstrumentor
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

if TYPE_CHECKING:
    from collections.abc import Sequence

INPUT = {"messages": [HumanMessage("What is the weather in Paris?")]}
MODES = ("bare", "noop_handler", "spans_no_export", "min_spans", "chatter_otel")


class _Drop(SpanExporter):
    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[object]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


class _Noop(BaseCallbackHandler):
    run_inline = True


class _MinSpans(BaseCallbackHandler):
    """Opens and closes one span per graph, node, LLM and tool run: nothing more."""

    run_inline = True

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.open: dict[Any, Any] = {}

    def _start(self, run_id: Any, parent_run_id: Any, name: str) -> None:
        parent = self.open.get(parent_run_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        self.open[run_id] = self.tracer.start_span(name, context=ctx)

    def _end(self, run_id: Any, *args: Any, **kwargs: Any) -> None:
        span = self.open.pop(run_id, None)
        if span is not None:
            span.end()

    def on_chain_start(self, s: Any, i: Any, *, run_id: Any, parent_run_id: Any = None, **kw: Any):
        tags = kw.get("tags") or []
        if parent_run_id is None or (
            parent_run_id in self.open and any(t.startswith("graph:step") for t in tags)
            and kw.get("name") != "__start__"
        ):  # fmt: skip
            self._start(run_id, parent_run_id, "node")

    def on_chat_model_start(self, s: Any, m: Any, *, run_id: Any, parent_run_id: Any = None, **kw):
        self._start(run_id, parent_run_id, "chat")

    def on_tool_start(self, s: Any, i: Any, *, run_id: Any, parent_run_id: Any = None, **kw: Any):
        self._start(run_id, parent_run_id, "tool")

    def on_chain_end(self, outputs: Any, *, run_id: Any, **kw: Any) -> None:
        self._end(run_id)

    def on_llm_end(self, response: Any, *, run_id: Any, **kw: Any) -> None:
        self._end(run_id)

    def on_tool_end(self, output: Any, *, run_id: Any, **kw: Any) -> None:
        self._end(run_id)


def _sync_round(graph: Any, runs: int, config: Any) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        graph.invoke(INPUT, config)
    return (time.perf_counter() - t0) / runs * 1e6


async def _async_round(graph: Any, runs: int, config: Any) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        await graph.ainvoke(INPUT, config)
    return (time.perf_counter() - t0) / runs * 1e6


def measure(runs: int = 25, rounds: int = 60, seed: int = 1) -> dict[str, Any]:
    graph = build_chat_graph()
    exporter = _Drop()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    configs = {
        "bare": None,
        "noop_handler": {"callbacks": [_Noop()]},
        "spans_no_export": {"callbacks": [_MinSpans(TracerProvider().get_tracer("bench"))]},
        "min_spans": {"callbacks": [_MinSpans(provider.get_tracer("bench"))]},
        "chatter_otel": None,
    }
    inst = LangGraphInstrumentor()
    loop = asyncio.new_event_loop()
    threads: set[int] = set()
    hops: list[bool] = []
    times: dict[str, dict[str, list[float]]] = {m: {"invoke": [], "ainvoke": []} for m in MODES}

    def round_(mode: str, method: str, n: int) -> None:
        if mode == "chatter_otel":
            inst.instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
            handler = inst.handler
            orig = handler.on_chat_model_start

            def spy(*a: Any, **k: Any) -> Any:
                threads.add(threading.get_ident())
                return orig(*a, **k)

            handler.on_chat_model_start = spy  # type: ignore[method-assign]
            threads.clear()
        try:
            cfg = configs[mode]
            if method == "invoke":
                times[mode][method].append(_sync_round(graph, n, cfg))
            else:
                times[mode][method].append(loop.run_until_complete(_async_round(graph, n, cfg)))
                if mode == "chatter_otel":
                    hops.append(bool(threads - {threading.get_ident()}))
        finally:
            if mode == "chatter_otel":
                inst.uninstrument()

    order = random.Random(seed)
    for method in ("invoke", "ainvoke"):
        for mode in MODES:  # warm-up: imports, caches, genai-prices' snapshot
            round_(mode, method, 20)
            times[mode][method].clear()
        for _ in range(rounds):
            for mode in order.sample(MODES, len(MODES)):
                round_(mode, method, runs)
    loop.close()
    provider.shutdown()

    out: dict[str, Any] = {"runs_per_round": runs, "rounds": rounds, "seed": seed}
    for method in ("invoke", "ainvoke"):
        bare = times["bare"][method]
        base = statistics.median(bare)
        out[method] = {}
        for mode in MODES:
            own = times[mode][method]
            diffs = [x - b for x, b in zip(own, bare, strict=True)]
            out[method][mode] = {
                "us": round(statistics.median(own), 1),
                "added_us": round(statistics.mean(diffs), 1),
                "added_se_us": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 1),
                "ratio": round(statistics.median(own) / base, 3),
            }
    out["async_thread_hop"] = any(hops)
    out["spans_exported"] = exporter.count
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    res = measure(args.runs, args.rounds, args.seed)
    print(f"runs per round: {res['runs_per_round']}, rounds: {res['rounds']} (shuffled order)")
    print(f"{'method':<8} {'mode':<16} {'µs/run':>9} {'added µs':>9} {'± se':>6} {'ratio':>6}")
    for method in ("invoke", "ainvoke"):
        for mode in MODES:
            r = res[method][mode]
            row = (method, mode, r["us"], r["added_us"], r["added_se_us"], r["ratio"])
            print("{:<8} {:<16} {:>9} {:>9} {:>6} {:>6}".format(*row))
    print(f"async thread hop: {res['async_thread_hop']}; spans exported: {res['spans_exported']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
