"""Do misbehaving sinks slow the app? The reference workflow under ``configure`` with:

* ``no_sinks``: events, monitoring and analytics switched off;
* ``builtin``: the built-in event bus (no subscriber), MonitoringService and LiveAnalytics;
* ``raising``: a MonitoringService whose every call raises;
* ``slow``: one that sleeps 20 ms in every call;
* ``blocking``: one stuck forever in its first call (its queue fills, then drops).

Interleaved rounds, medians of per-round means, µs per ``invoke``; the ratio is against
``builtin``. Sinks run on a background worker, so all four should be within the noise.

    python -m benchmarks.bench_sinks [--runs N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from benchmarks.bench_overhead import _Drop
from chatter_otel import configure
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.sinks.monitoring import MonitoringService

INPUT = {"messages": [HumanMessage("What is the weather in Paris?")]}


class Raising(MonitoringService):
    def record_llm_operation(self, metrics: Any) -> None:
        raise RuntimeError("down")

    def start_workflow_tracking(self, *a: Any, **k: Any) -> str:
        raise RuntimeError("down")


class Slow(MonitoringService):
    def record_llm_operation(self, metrics: Any) -> None:
        time.sleep(0.02)
        super().record_llm_operation(metrics)


class Blocking(MonitoringService):
    gate = threading.Event()

    def record_llm_operation(self, metrics: Any) -> None:
        self.gate.wait()


MODES: dict[str, dict[str, Any]] = {
    "no_sinks": {"events": False, "monitoring": False, "analytics": False},
    "builtin": {},
    "raising": {"monitoring": Raising()},
    "slow": {"monitoring": Slow()},
    "blocking": {"monitoring": Blocking()},
}


def _round(graph: Any, runs: int, options: dict[str, Any]) -> float:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Drop(), max_queue_size=65536))
    tel = configure(tracer_provider=provider, prices=LOCAL_MODEL_PRICES, log_correlation=False,
                    **options)  # fmt: skip
    try:
        t0 = time.perf_counter()
        for _ in range(runs):
            graph.invoke(INPUT)
        return (time.perf_counter() - t0) / runs * 1e6
    finally:
        tel.shutdown(timeout_millis=200)
        provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    graph = build_chat_graph()
    for options in MODES.values():
        _round(graph, 10, options)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode, options in MODES.items():
            times[mode].append(_round(graph, args.runs, options))
    Blocking.gate.set()
    base = statistics.median(times["builtin"])
    print(f"runs per round: {args.runs}, rounds: {args.rounds} (medians); ratio vs builtin")
    for mode, values in times.items():
        med = statistics.median(values)
        print(f"{mode:<10} {med:9.1f} µs/run  ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
