"""configure() wires metrics, logs and outbound propagation the standard way."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry import baggage, context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel import configure, track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _readers(tel: Any) -> list[str]:
    return [type(r).__name__ for r in tel.meter_provider._metric_readers]


@pytest.mark.parametrize(
    ("value", "readers"),
    [
        ("console", ["PeriodicExportingMetricReader"]),
        ("none", None),
        ("bogus,console", ["PeriodicExportingMetricReader"]),
    ],
)
def test_a_meter_provider_from_otel_metrics_exporter(
    monkeypatch: pytest.MonkeyPatch, value: str, readers: list[str] | None
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", value)
    tel = configure(tracer_provider=TracerProvider(), set_global=False)
    try:
        if readers is None:
            assert not isinstance(tel.meter_provider, MeterProvider)
        else:
            assert _readers(tel) == readers
    finally:
        tel.shutdown()


def test_prometheus_serves_the_genai_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
    tel = configure(tracer_provider=TracerProvider(), set_global=False,
                    prices=LOCAL_MODEL_PRICES)  # fmt: skip
    try:
        build_chat_graph().invoke(Q)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        assert "gen_ai_client_token_usage" in text
        assert 'gen_ai_token_type="input"' in text
        assert "chatter_gen_ai_cost" in text
    finally:
        tel.shutdown()


def test_the_app_s_meter_provider_is_used_and_span_drops_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # down
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    reader = InMemoryMetricReader()
    mine = MeterProvider(metric_readers=[reader])
    tel = configure(meter_provider=mine, set_global=False)
    try:
        assert tel.meter_provider is mine
        for _ in range(3):
            build_chat_graph().invoke(Q)
        points = {
            (m.name, p.attributes.get("error.type")): p.value
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics
            for p in m.data.data_points if hasattr(p, "value")
        }  # fmt: skip
        assert points[("otel.sdk.processor.span.processed", "queue_full")] > 0
    finally:
        tel.shutdown(500)


LOGS_BEFORE = """
import logging, os
handler = logging.StreamHandler()
from chatter_otel.correlation import CorrelationLogFilter
handler.addFilter(CorrelationLogFilter())
handler.setFormatter(logging.Formatter(
    "%(levelname)s correlation_id=%(correlation_id)s trace_id=%(trace_id)s %(message)s"))
logging.basicConfig(level=logging.INFO, handlers=[handler])
logging.getLogger("app").info("before configure")
os.environ["CHATTER_OTEL_MAX_RUNS"] = "lots"  # configure's own warning, formatted too
from opentelemetry.sdk.trace import TracerProvider
import chatter_otel
tel = chatter_otel.configure(tracer_provider=TracerProvider())
with chatter_otel.track_workflow("w", correlation_id="req-log-1"):
    logging.getLogger("app").info("inside a run")
tel.shutdown()
"""


def test_log_ids_are_safe_from_the_first_line() -> None:
    out = subprocess.run([sys.executable, "-c", LOGS_BEFORE], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "KeyError" not in err and "--- Logging error ---" not in err
    assert "correlation_id= trace_id= before configure" in err
    assert "CHATTER_OTEL_MAX_RUNS" in err  # configure's own warning went through the format
    line = next(x for x in err.splitlines() if "inside a run" in x)
    assert "correlation_id=req-log-1" in line and "trace_id=" in line
    assert len(line.split("trace_id=")[1].split()[0]) == 32


def test_log_records_carry_the_logging_instrumentation_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tel = configure(tracer_provider=TracerProvider(), set_global=False)
    try:
        with caplog.at_level(logging.INFO), track_workflow("w") as run:
            logging.getLogger("app").info("hello")
        record = next(r for r in caplog.records if r.getMessage() == "hello")
        assert record.otelTraceID == run.trace_id  # type: ignore[attr-defined]
        assert record.trace_id == run.trace_id  # type: ignore[attr-defined]
    finally:
        tel.shutdown()


def test_outbound_calls_carry_traceparent_and_the_correlation_id(openai_server: Any) -> None:
    from langchain_openai import ChatOpenAI

    tel = configure(tracer_provider=TracerProvider(), set_global=False)
    try:
        model = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.url, api_key="k")
        token = context.attach(baggage.set_baggage("chatter.correlation.id", "req-out-1"))
        try:
            with track_workflow("w") as run:
                model.invoke("hi")
        finally:
            context.detach(token)
        (headers,) = openai_server.headers
        assert headers["traceparent"].split("-")[1] == run.trace_id
        assert "chatter.correlation.id=req-out-1" in headers.get("baggage", "")
    finally:
        tel.shutdown()
        time.sleep(0)


@pytest.mark.parametrize(
    ("value", "names"),
    [("console", "console"), ("otlp,console", "otlp,console"), ("local,bogus", "local"),
     ("none", "none"), ("chatter_local", "local")],
)  # fmt: skip
def test_otel_traces_exporter_takes_lists_and_console(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capfd: pytest.CaptureFixture[str],
    value: str, names: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("CHATTER_OTEL_TRACE_STORE", str(tmp_path / "t.db"))
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    tel = configure(set_global=False)
    try:
        assert tel.exporter_name == names
        build_chat_graph().invoke(Q)
        tel.force_flush(2_000)
        printed = capfd.readouterr().out
        assert ('"name": "invoke_workflow chat"' in printed) == ("console" in names)
        assert (tel.trace_store is not None) == ("local" in names)
    finally:
        tel.shutdown(1_000)
