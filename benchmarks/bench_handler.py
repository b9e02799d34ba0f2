"""The handler's own cost per run, free of LangGraph's noise: record once, replay many times.

One run of the reference workflow is recorded (every callback LangChain makes, with its real
arguments: messages, ``LLMResult`` objects, metadata). The sequence is then replayed, with fresh
run ids each time, into

* ``min_spans``: a handler that only opens and closes the same 7 spans (the SDK's floor), and
* ``chatter_otel``: the real handler (usage extraction, pricing, roll-ups, ids, registry).

The difference is what chatter-otel's logic costs per run beyond creating the spans. Both
replay through ``BatchSpanProcessor`` into a dropping exporter.

    python -m benchmarks.bench_handler [--runs N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from benchmarks.bench_overhead import _Drop, _MinSpans
from chatter_otel import LangGraphInstrumentor
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

_EVENTS = (
    "on_chain_start",
    "on_chain_end",
    "on_chain_error",
    "on_chat_model_start",
    "on_llm_new_token",
    "on_llm_end",
    "on_llm_error",
    "on_tool_start",
    "on_tool_end",
    "on_tool_error",
)


class _Recorder(BaseCallbackHandler):
    run_inline = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in _EVENTS:
            calls = object.__getattribute__(self, "calls")
            return lambda *a, **k: calls.append((name, a, k))
        return object.__getattribute__(self, name)


def record() -> tuple[list[tuple[str, tuple[Any, ...], dict[str, Any]]], list[Any]]:
    """The callbacks of one reference run, and the graph run ids announced for it."""
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=TracerProvider(), prices=LOCAL_MODEL_PRICES)
    announced: list[Any] = []
    handler = inst.handler
    orig = handler.expect_graph

    def spy(run_id: Any, *a: Any) -> None:
        announced.append((run_id, a))
        orig(run_id, *a)

    handler.expect_graph = spy  # type: ignore[method-assign]
    rec = _Recorder()
    build_chat_graph().invoke(
        {"messages": [HumanMessage("weather in Paris")]}, {"callbacks": [rec]}
    )
    inst.uninstrument()
    return rec.calls, announced


def replay(handler: Any, calls: list[Any], announced: list[Any], runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        ids: dict[Any, Any] = {}
        expect = getattr(handler, "expect_graph", None)
        for run_id, a in announced:
            ids[run_id] = uuid.uuid4()
            if expect is not None:
                expect(ids[run_id], *a)
        for name, args, kwargs in calls:
            kw = dict(kwargs)
            for key in ("run_id", "parent_run_id"):
                old = kw.get(key)
                if old is not None:
                    if old not in ids:
                        ids[old] = uuid.uuid4()
                    kw[key] = ids[old]
            getattr(handler, name)(*args, **kw)
    return (time.perf_counter() - t0) / runs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    calls, announced = record()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=65536))
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
    ours = inst.handler
    floor = _MinSpans(provider.get_tracer("bench"))
    res: dict[str, list[float]] = {"min_spans": [], "chatter_otel": []}
    replay(ours, calls, announced, 200)
    replay(floor, calls, announced, 200)
    for _ in range(args.rounds):
        res["min_spans"].append(replay(floor, calls, announced, args.runs))
        res["chatter_otel"].append(replay(ours, calls, announced, args.runs))
    inst.uninstrument()
    provider.shutdown()
    lo, hi = statistics.median(res["min_spans"]), statistics.median(res["chatter_otel"])
    print(f"callbacks per run: {len(calls)}; runs per round: {args.runs}, rounds: {args.rounds}")
    print(f"min_spans     {lo:8.1f} µs/run")
    print(f"chatter_otel  {hi:8.1f} µs/run  (+{hi - lo:.1f} µs of our own logic per run)")


if __name__ == "__main__":
    main()
