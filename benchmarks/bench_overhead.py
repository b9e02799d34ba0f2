"""Instrumentation overhead against a bare LangGraph run, measured in one process run.

The graph is the reference workflow (2 LLM calls, 1 tool call, the local chat model), run with
``invoke`` and ``ainvoke`` in four modes, in interleaved rounds so that drift in the machine's
speed hits all alike:

* ``bare``: no instrumentation, no callback handler;
* ``noop_handler``: one do-nothing inline LangChain callback handler, the cost LangChain itself
  adds as soon as any handler listens (a floor no callback-based instrumentation can go under);
* ``min_spans``: a handler that only opens and closes the same 7 spans, nothing else (the floor
  for this span tree with the OpenTelemetry SDK);
* ``chatter_otel``: ``LangGraphInstrumentor`` with pricing, roll-ups and ids.

Spans go through the SDK's ``BatchSpanProcessor`` to an exporter that drops them: export runs
off the request path and is not counted. Reported: the median over rounds of each round's mean
µs per run, the added µs against ``bare`` and the ratio. It also checks that async runs make no
thread hop (the handler must run on the event loop's thread).

    python -m benchmarks.bench_overhead [--runs N] [--rounds R] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from chatter_otel.demo import build_chat_graph
from chatter_otel.local_model import LOCAL_MODEL_PRICES

if TYPE_CHECKING:
    from collections.abc import Sequence

INPUT = {"messages": [HumanMessage("What is the weather in Paris?")]}
MODES = ("bare", "noop_handler", "min_spans", "chatter_otel")


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


def measure(runs: int = 200, rounds: int = 7) -> dict[str, Any]:
    graph = build_chat_graph()
    exporter = _Drop()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    configs = {
        "bare": None,
        "noop_handler": {"callbacks": [_Noop()]},
        "min_spans": {"callbacks": [_MinSpans(provider.get_tracer("bench"))]},
        "chatter_otel": None,
    }
    inst = LangGraphInstrumentor()
    loop = asyncio.new_event_loop()
    threads: set[int] = set()
    times: dict[str, dict[str, list[float]]] = {m: {"invoke": [], "ainvoke": []} for m in MODES}

    def round_(mode: str, n: int) -> None:
        if mode == "chatter_otel":
            inst.instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
            handler = inst.handler
            orig = handler.on_chat_model_start

            def spy(*a: Any, **k: Any) -> Any:
                threads.add(threading.get_ident())
                return orig(*a, **k)

            handler.on_chat_model_start = spy  # type: ignore[method-assign]
        try:
            cfg = configs[mode]
            times[mode]["invoke"].append(_sync_round(graph, n, cfg))
            threads.clear()
            times[mode]["ainvoke"].append(loop.run_until_complete(_async_round(graph, n, cfg)))
            if mode == "chatter_otel":
                hop = bool(threads - {threading.get_ident()})
                times[mode].setdefault("hop", []).append(float(hop))
        finally:
            if mode == "chatter_otel":
                inst.uninstrument()

    for mode in MODES:  # warm-up: imports, caches, genai-prices' snapshot
        round_(mode, 20)
    for m in times.values():
        m["invoke"].clear()
        m["ainvoke"].clear()
    for _ in range(rounds):
        for mode in MODES:
            round_(mode, runs)
    loop.close()
    provider.shutdown()

    out: dict[str, Any] = {"runs_per_round": runs, "rounds": rounds}
    for method in ("invoke", "ainvoke"):
        bare = statistics.median(times["bare"][method])
        out[method] = {}
        for mode in MODES:
            med = statistics.median(times[mode][method])
            out[method][mode] = {
                "us": round(med, 1),
                "added_us": round(med - bare, 1),
                "ratio": round(med / bare, 3),
            }
    out["async_thread_hop"] = any(times["chatter_otel"].get("hop", []))
    out["spans_exported"] = exporter.count
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    res = measure(args.runs, args.rounds)
    print(f"runs per round: {res['runs_per_round']}, rounds: {res['rounds']} (medians)")
    print(f"{'method':<8} {'mode':<13} {'µs/run':>9} {'added µs':>9} {'ratio':>6}")
    for method in ("invoke", "ainvoke"):
        for mode in MODES:
            r = res[method][mode]
            row = (method, mode, r["us"], r["added_us"], r["ratio"])
            print("{:<8} {:<13} {:>9} {:>9} {:>6}".format(*row))
    print(f"async thread hop: {res['async_thread_hop']}; spans exported: {res['spans_exported']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
