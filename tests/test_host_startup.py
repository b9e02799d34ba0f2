"""configure() works where apps call it (module level, create_app, the lifespan), and every
response, a 500 included, carries the correlation id and `traceresponse`."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import chatter_otel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator


def _serve(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def _app(where: str, provider: TracerProvider) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if where == "lifespan":
            chatter_otel.configure(app=app, tracer_provider=provider)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("upstream model failed")

    if where == "create_app":
        chatter_otel.configure(app=app, tracer_provider=provider)
    elif where == "module_then_app":
        chatter_otel.configure(tracer_provider=provider)  # at import, no app yet
        chatter_otel.configure(app=app)  # then in create_app: completes the first
    return app


@pytest.fixture
def telemetry_reset() -> Iterator[None]:
    yield
    from chatter_otel import telemetry

    if telemetry._current is not None:
        telemetry._current.shutdown()


@pytest.mark.parametrize("where", ["create_app", "lifespan", "module_then_app"])
def test_ids_on_every_response_wherever_configure_ran(
    where: str, telemetry_reset: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="chatter_otel")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    base, server, thread = _serve(_app(where, provider))
    try:
        for path, expected in (("/ok", 200), ("/boom", 500)):
            status, headers = _get(base + path, {"X-Correlation-ID": f"req-{where}-{expected}"})
            assert status == expected
            assert headers["x-correlation-id"] == f"req-{where}-{expected}"
            trace_id = headers["traceresponse"].split("-")[1]
            for _ in range(100):  # the server span ends just after the response is sent
                server_spans = [
                    s for s in exporter.get_finished_spans()
                    if format(s.context.trace_id, "032x") == trace_id and s.parent is None
                ]  # fmt: skip
                if server_spans:
                    break
                time.sleep(0.02)
            assert len(server_spans) == 1, [s.name for s in exporter.get_finished_spans()]
            assert server_spans[0].attributes["chatter.correlation.id"] == (
                f"req-{where}-{expected}"
            )
        status, headers = _get(base + "/boom")  # no header: a new id, on the 500 too
        assert status == 500 and len(headers["x-correlation-id"]) == 32
        if where == "lifespan":
            assert "ran after the app started" in caplog.text
        assert "Cannot add middleware" not in caplog.text
    finally:
        server.should_exit = True
        thread.join(10)
