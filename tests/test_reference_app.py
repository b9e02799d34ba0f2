"""The reference app served on loopback, exporting through the rotel collector to a receiver.

app --OTLP (gRPC or HTTP)--> rotel (a real collector binary) --OTLP gRPC--> receiver built on
opentelemetry-proto. Plus the app's own rows, streaming, and a collector that is down.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatter_otel.reference.app import create_app, create_tables
from tests.conftest import rotel_forwarding, start_grpc_receiver

if TYPE_CHECKING:
    from collections.abc import Iterator

ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER",
    "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def collector(otlp_grpc: Any, tmp_path: Any) -> Iterator[dict[str, Any]]:
    """rotel listening on gRPC and HTTP, forwarding to the receiver over gRPC."""
    grpc_port, http_port = _free_port(), _free_port()
    with rotel_forwarding(grpc_port, http_port, otlp_grpc.endpoint, tmp_path):
        yield {"grpc": grpc_port, "http": http_port, "receiver": otlp_grpc}


class Served:
    def __init__(self, app: Any) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.telemetry.shutdown()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Any]:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    started: list[Served] = []

    def _serve(meter_provider: Any = None, **env: str) -> Served:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        app = create_app(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/app.db", set_global=False,
            meter_provider=meter_provider,
        )  # fmt: skip
        asyncio.run(create_tables(app))
        served = Served(app)
        started.append(served)
        return served

    yield _serve
    for s in started:
        s.close()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_chat_through_rotel_to_the_receiver(serve: Any, collector: Any, protocol: str) -> None:
    port = collector["grpc"] if protocol == "grpc" else collector["http"]
    app = serve(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                OTEL_EXPORTER_OTLP_PROTOCOL=protocol)  # fmt: skip
    assert app.app.state.telemetry.exporter_name == "otlp"
    status, h1, body1 = app.request("POST", "/chat", {"message": "weather in Paris"},
                                    {"X-Correlation-ID": "inc-42"})  # fmt: skip
    assert status == 200, body1
    first = json.loads(body1)
    assert h1["x-correlation-id"] == "inc-42"
    assert h1["traceresponse"].split("-")[1] == first["trace_id"]
    again = {"message": "weather in Oslo", "conversation_id": first["conversation_id"]}
    status, h2, body2 = app.request(
        "POST", "/chat", again, {"X-Correlation-ID": "bad value\twith tab"}
    )
    assert status == 200, body2
    second = json.loads(body2)
    assert h2["x-correlation-id"] != "bad value\twith tab" and len(h2["x-correlation-id"]) == 32

    # The app's rows: usage on the assistant messages, exact conversation totals.
    status, _, body = app.request("GET", f"/conversations/{first['conversation_id']}")
    conv = json.loads(body)
    assistants = [m for m in conv["messages"] if m["role"] == "ASSISTANT"]
    assert [m["id"] for m in assistants] == [first["message_id"], second["message_id"]]
    for m, turn in zip(assistants, (first, second), strict=True):
        assert len(m["id"]) == 26
        assert m["prompt_tokens"] == turn["usage"]["prompt_tokens"] > 0
        assert m["total_tokens"] == m["prompt_tokens"] + m["completion_tokens"]
        assert m["provider_used"] == "chatter.local" and m["model_used"] == "chatter-local-1"
        assert m["finish_reason"] == "stop"
        assert m["cost"] is not None and float(m["cost"]) > 0
        assert m["response_time_ms"] is not None
    assert conv["message_count"] == 4
    assert conv["total_tokens"] == sum(m["total_tokens"] for m in assistants)
    assert float(conv["total_cost"]) == pytest.approx(sum(float(m["cost"]) for m in assistants))

    # What crossed the network: every span, each with its request's correlation id.
    app.app.state.telemetry.force_flush()
    receiver = collector["receiver"]
    deadline = time.monotonic() + 20
    by_trace: dict[str, list[Any]] = {}
    while time.monotonic() < deadline:
        by_trace = {}
        for res, span in receiver.spans():
            by_trace.setdefault(span.trace_id.hex(), []).append((res, span))
        if {first["trace_id"], second["trace_id"]} <= by_trace.keys() and all(
            any(s.name == "POST /chat" for _, s in by_trace[t])
            for t in (first["trace_id"], second["trace_id"])
        ):
            break
        time.sleep(0.1)
    for turn, cid in ((first, "inc-42"), (second, h2["x-correlation-id"])):
        spans = by_trace[turn["trace_id"]]
        names = {s.name for _, s in spans}
        assert {"POST /chat", "invoke_workflow chat", "chat chatter-local-1",
                "execute_tool get_weather"} <= names, names  # fmt: skip
        assert any("INSERT INTO messages" in s.name or s.name.startswith("INSERT")
                   for _, s in spans), names  # fmt: skip
        for res, span in spans:
            assert res["service.name"] == "chatter-reference-app"
            attrs = {a.key: a.value.string_value for a in span.attributes}
            assert attrs.get("chatter.correlation.id") == cid, span.name


def test_streaming_endpoint(serve: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATTER_OTEL_TRACE_STORE", str(tmp_path / "t.db"))
    app = serve()
    status, headers, body = app.request("POST", "/chat/stream", {"message": "weather in Tokyo"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block for block in body.decode().split("\n\n") if block.strip()]
    tokens = [json.loads(e.split("data: ", 1)[1]) for e in events if e.startswith("event: token")]
    assert "".join(tokens).endswith("Tokyo: 24°C, clear")
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert done["usage"]["llm_calls"] == 2 and done["usage"]["total_tokens"] > 0
    status, _, body = app.request("GET", f"/conversations/{done['conversation_id']}")
    (assistant,) = [m for m in json.loads(body)["messages"] if m["role"] == "ASSISTANT"]
    assert assistant["total_tokens"] == done["usage"]["total_tokens"]
    # and it is in the local trace store, findable by conversation
    store = app.app.state.telemetry.trace_store
    app.app.state.telemetry.force_flush()
    (summary,) = store.find(conversation_id=done["conversation_id"])
    assert summary.trace_id == done["trace_id"]


def test_collector_down_then_back(serve: Any) -> None:
    reader = InMemoryMetricReader()
    port = _free_port()
    app = serve(
        meter_provider=MeterProvider(metric_readers=[reader]),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED="true",  # the SDK's own drop counter
        OTEL_BSP_MAX_QUEUE_SIZE="16", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8",
        OTEL_BSP_SCHEDULE_DELAY="50", OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )  # fmt: skip
    for i in range(8):  # ~20 spans each while the collector is down: the app keeps serving
        status, _, body = app.request("POST", "/chat", {"message": f"weather in C{i}"})
        assert status == 200, body
    points: dict[str, list[Any]] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points.setdefault(m.name, []).extend(m.data.data_points)
    dropped = sum(
        p.value for p in points["otel.sdk.processor.span.processed"]
        if p.attributes.get("error.type") == "queue_full"
    )  # fmt: skip
    assert dropped > 0  # the drop count, as the SDK's standard metric
    assert max(p.value for p in points["otel.sdk.processor.span.queue.size"]) <= 16  # bounded
    assert [p.value for p in points["otel.sdk.processor.span.queue.capacity"]] == [16]

    # The collector comes back on the same port: export resumes.
    received, server = start_grpc_receiver(port)
    try:
        deadline = time.monotonic() + 30
        ok = None
        while time.monotonic() < deadline:
            status, _, body = app.request("POST", "/chat", {"message": "weather in Back"})
            ok = json.loads(body)["trace_id"]
            app.app.state.telemetry.force_flush(2_000)
            if any(s.trace_id.hex() == ok for _, s in received.spans()):
                break
            time.sleep(0.5)
        assert any(s.trace_id.hex() == ok for _, s in received.spans())
    finally:
        server.stop(grace=None)
