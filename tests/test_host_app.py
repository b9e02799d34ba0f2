"""A host app shaped like a real chat backend, configured only as the README says: its own
correlation middleware (it reads X-Correlation-ID or makes a 26-character id, keeps it in a
ContextVar, logs it, echoes it), added before or after configure(). The id the client gets is
the id on every span, event, monitoring entry and log line, and `find` finds it; 500s too."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI, Request
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.middleware.base import BaseHTTPMiddleware

import chatter_otel
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.traces.cli import main as cli
from tests.test_host_startup import _get, _serve

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.responses import Response

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("rid", default=None)
log = logging.getLogger("host.app")


class AppCorrelation(BaseHTTPMiddleware):
    """The host app's own: accepts any non-empty header under 64 chars, else a 26-char id."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        raw = request.headers.get("x-correlation-id")
        rid = raw if raw and len(raw) < 64 else uuid.uuid4().hex[:26].upper()
        token = request_id.set(rid)
        try:
            log.info("request %s", request.url.path)
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Correlation-ID"] = rid
        return response


class Bus:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> None:
        self.events.append(event)


def _host(order: str, provider: TracerProvider, bus: Bus, store: str) -> FastAPI:
    app = FastAPI()
    graph = build_chat_graph()

    @app.get("/chat")
    async def chat() -> dict[str, str]:
        out = await graph.ainvoke({"messages": [HumanMessage("What is the weather in Paris?")]})
        return {"answer": str(out["messages"][-1].content)}

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        await graph.ainvoke({"messages": [HumanMessage("What is the weather in Paris?")]})
        raise RuntimeError("upstream model error")

    options = {"tracer_provider": provider, "events": bus, "prices": LOCAL_MODEL_PRICES,
               "correlation_context_var": request_id, "trace_store": store}  # fmt: skip
    if order == "app_middleware_first":
        app.add_middleware(AppCorrelation)
        chatter_otel.configure(app=app, **options)
    else:
        chatter_otel.configure(app=app, **options)
        app.add_middleware(AppCorrelation)
    return app


@pytest.mark.parametrize("order", ["app_middleware_first", "configure_first"])
@pytest.mark.parametrize(
    ("path", "header"),
    [("/chat", None), ("/chat", "req-77"), ("/chat", "x/../../etc/passwd"), ("/boom", None)],
    ids=["no-header", "header", "valid-for-the-app-only", "http-500"],
)
def test_the_client_s_id_is_the_id_everywhere(
    order: str, path: str, header: str | None, tmp_path: Any,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = str(tmp_path / "traces.db")
    from chatter_otel.export.store import LocalStoreExporter, LocalTraceStore

    provider.add_span_processor(SimpleSpanProcessor(LocalStoreExporter(LocalTraceStore(store))))
    bus = Bus()
    base, server, thread = _serve(_host(order, provider, bus, store))
    try:
        status, headers = _get(base + path, {"X-Correlation-ID": header} if header else None)
        assert status == (500 if path == "/boom" else 200)
        rid = headers["x-correlation-id"]
        hostile = header == "x/../../etc/passwd"
        if hostile:  # the app echoes it; our spans and events carry an id of ours instead
            assert rid == header
            rid = None
        elif not header:
            # One id for the whole request, the one the app keeps: ours (outermost) makes it
            # and hands it to the app as the request's header, and the app adopts it (else a
            # body read before the app's middleware would carry an id the app never knew)
            assert re.fullmatch(r"[0-9a-f]{32}", rid)
        assert "traceresponse" in headers
        trace_id = headers["traceresponse"].split("-")[1]
        for _ in range(100):
            spans = [s for s in exporter.get_finished_spans()
                     if format(s.context.trace_id, "032x") == trace_id]  # fmt: skip
            if any(s.parent is None for s in spans):
                break
            time.sleep(0.02)
        ours = [s for s in spans if s.name.startswith(("invoke_", "chat ", "execute_tool"))]
        assert len(ours) == 7
        if hostile:
            (rid,) = {s.attributes.get("chatter.correlation.id") for s in spans}
            assert re.fullmatch(r"[0-9a-f]{32}", rid)
            assert "ignored an invalid correlation id from the app" in caplog.text
        elif header:
            assert rid == header
        assert {s.attributes.get("chatter.correlation.id") for s in spans} == {rid}, [
            s.name for s in spans if s.attributes.get("chatter.correlation.id") != rid
        ]
        assert {e.correlation_id for e in bus.events} == {rid}
        tel = chatter_otel.telemetry._current
        assert tel.force_flush()
        recent = tel.monitoring.get_workflow_stats()["recent"]
        assert [w.correlation_id for w in recent] == [rid]
        lines = [r for r in caplog.records if r.name == "host.app"]
        assert lines and all(r.correlation_id == rid for r in lines)  # type: ignore[attr-defined]
        assert cli(["find", "--correlation-id", rid, "--store", store, "--json"]) == 0
        assert trace_id in capsys.readouterr().out
    finally:
        server.should_exit = True
        thread.join(10)
        chatter_otel.telemetry._current.shutdown()
