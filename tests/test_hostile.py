"""Hostile input at the edges: baggage, its log lines, and bounded state (issue "Nothing hostile
gets through the edges")."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry import baggage, context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import LocalTraceStore, configure, last_run
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.traces.spans import SpanRecord

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
HOSTILE = "req-1\r\nX-Injected: 1<script>alert(1)</script>"


class ListBus:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> None:
        self.events.append(event)


@pytest.fixture
def zero_code() -> Any:
    """configure() without the app object: no middleware, ids only from W3C baggage."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = ListBus()
    tel = configure(tracer_provider=provider, events=bus, prices=LOCAL_MODEL_PRICES)
    yield exporter, bus
    tel.shutdown()


@pytest.mark.parametrize(("value", "kept"), [(HOSTILE, None), ("req-7f3a", "req-7f3a")])
def test_a_baggage_correlation_id_is_validated(
    zero_code: Any, value: str, kept: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    exporter, bus = zero_code
    token = context.attach(baggage.set_baggage("chatter.correlation.id", value))
    try:
        build_chat_graph().invoke(Q)
    finally:
        context.detach(token)
    spans = exporter.get_finished_spans()
    assert len(spans) == 7
    assert {s.attributes.get("chatter.correlation.id") for s in spans} == {kept}
    assert {e.correlation_id for e in bus.events} == {kept}
    run = last_run()
    assert run is not None and run.correlation_id == kept
    if kept is None:
        assert "invalid correlation id from baggage" in caplog.text
        assert "script" not in caplog.text and "Injected" not in caplog.text


def test_hostile_baggage_headers_are_logged_briefly_and_rarely(
    zero_code: Any, caplog: pytest.LogCaptureFixture
) -> None:
    propagator = W3CBaggagePropagator()
    with caplog.at_level(logging.WARNING, logger="opentelemetry.baggage.propagation"):
        for _ in range(50):
            propagator.extract({"baggage": "k=" + "v" * 9000})  # over the 8 KB limit
            propagator.extract({"baggage": "no-equals-sign\r\n<script>" + "x" * 30000})
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry.bag")]
    assert 1 <= len(lines) <= 3  # one per kind of line a minute, not 100
    assert all(len(line) < 300 for line in lines), lines
    assert not any("<script>" in line or "vvvv" in line for line in lines)


def test_the_local_store_holds_exactly_its_cap(tmp_path: Any) -> None:
    store = LocalTraceStore(tmp_path / "traces.db", max_spans=3000)
    now = time.time_ns()
    for batch in range(80):  # 8000 spans, 100 a batch
        store.write(
            SpanRecord(f"{batch:032x}", f"{batch * 100 + i:016x}", None, "s",
                       now + batch * 100 + i, now + batch * 100 + i + 1, "OK")
            for i in range(100)
        )  # fmt: skip
        (count,) = store._db().execute("SELECT COUNT(*) FROM spans").fetchone()
        assert count == min((batch + 1) * 100, 3000)
    store.close()


def test_runs_that_never_finish_leave_no_active_monitoring_entries() -> None:
    provider = TracerProvider()
    tel = configure(tracer_provider=provider, prices=LOCAL_MODEL_PRICES, max_runs=16)
    try:
        graph = build_chat_graph()
        # graph streams started and dropped: their runs never end by themselves
        pending = []
        for _ in range(40):
            gen = graph.stream(Q)
            next(gen)
            pending.append(gen)
        assert tel.force_flush()
        ops = tel.monitoring.get_workflow_stats()["workflow_ops"]
        # the registry ended the oldest as orphaned; monitoring finished them
        assert ops["started"] == 40
        assert ops["active"] <= 16 and ops["finished"] == 40 - ops["active"]
        (fanout,) = (p for p in provider._active_span_processor._span_processors
                     if type(p).__name__ == "RecordFanout")  # fmt: skip
        processor = fanout.sinks["monitoring"]
        assert len(processor._ids) <= 16
        for gen in pending:
            gen.close()
    finally:
        tel.shutdown()
