"""Every span that never leaves the process is counted, exactly: a real collector binary (rotel)
stopped and started in front of an OTLP receiver, the app exporting to it all along."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from langchain_core.messages import HumanMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import configure
from chatter_otel.reference.demo import build_chat_graph
from tests.conftest import Received, rotel_forwarding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _dropped(reader: InMemoryMetricReader) -> dict[str, int]:
    out: dict[str, int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "chatter.spans.dropped":
                    for point in metric.data.data_points:
                        why = str(point.attributes["error.type"])
                        assert point.attributes["chatter.exporter"] == "otlp"
                        out[why] = out.get(why, 0) + int(point.value)
    return out


def _received(otlp: Received) -> set[bytes]:
    return {span.span_id for _, span in otlp.spans()}


def test_a_collector_outage_loses_exactly_what_is_counted(
    otlp_grpc: Received, tmp_path: Any, monkeypatch: Any, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, "chatter_otel")
    grpc_port, http_port = _free_port(), _free_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{http_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # give up on a batch after ~1 s
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "200")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    made = InMemorySpanExporter()  # every span the app made, sampled and finished
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(made))
    reader = InMemoryMetricReader()
    tel = configure(tracer_provider=provider, exporter="otlp", set_global=False,
                    meter_provider=MeterProvider(metric_readers=[reader]))  # fmt: skip
    graph = build_chat_graph()

    def chats(n: int) -> None:
        for i in range(n):
            graph.invoke({"messages": [HumanMessage(f"weather in Oslo {i}")]})

    def settle(timeout: float = 30.0) -> tuple[int, int, dict[str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            tel.force_flush(2_000)
            produced, got, lost = (
                len(made.get_finished_spans()),
                _received(otlp_grpc),
                _dropped(reader),
            )
            if len(got) + sum(lost.values()) >= produced or time.monotonic() > deadline:
                return produced, len(got), lost
            time.sleep(0.2)

    try:
        with rotel_forwarding(grpc_port, http_port, otlp_grpc.endpoint, tmp_path):
            chats(5)
            produced, got, lost = settle()
            assert (got, lost) == (produced, {})  # nothing lost while the collector is up
        # the collector is down: 150 chats of 7 spans into a queue of 200, drained at ~64 spans
        # a second (each failing batch retries until its 1 s timeout): the queue overflows
        # unless the chats take over 13 s, however loaded the machine
        chats(150)
        time.sleep(3)  # failed exports after their retries
        assert "spans are being lost by the otlp exporter" in caplog.text
        with rotel_forwarding(grpc_port, http_port, otlp_grpc.endpoint, tmp_path):
            chats(5)
            produced, got, lost = settle()
        assert produced == 160 * 7  # a chat run is 7 spans
        assert lost.get("queue_full", 0) > 0 and lost.get("export_failed", 0) > 0
        assert got + sum(lost.values()) == produced  # lost = counted, exactly
        assert "the otlp exporter delivers again after" in caplog.text
        line = next(r.getMessage() for r in caplog.records if "delivers again" in r.getMessage())
        assert f"the incident lost {sum(lost.values())} span(s)" in line
    finally:
        tel.shutdown()


def test_any_registered_exporter_name_works(
    otlp_http: Received, monkeypatch: Any, caplog: Any
) -> None:
    """``OTEL_TRACES_EXPORTER`` names resolve through the SDK's entry points, as under
    ``opentelemetry-instrument``; an unknown one warns and lists what is registered."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_http.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    tel = configure(tracer_provider=TracerProvider(), set_global=False,
                    exporter="otlp_proto_http,no_such_exporter")  # fmt: skip
    try:
        assert tel.exporter_name == "otlp_proto_http"
        build_chat_graph().invoke({"messages": [HumanMessage("weather in Oslo")]})
        assert tel.force_flush()
        assert len(otlp_http.wait_for(7)) == 7
        assert "ignoring 'no_such_exporter' in exporter=" in caplog.text
        assert "otlp_proto_grpc" in caplog.text and "chatter_local" in caplog.text
    finally:
        tel.shutdown()
