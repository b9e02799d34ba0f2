"""Correlation ids end to end: a FastAPI app served on loopback, the graph, SQL, outbound HTTP."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from langchain_core.messages import HumanMessage
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from chatter_otel import configure
from chatter_otel.correlation import CorrelationLogFilter, current_correlation_id
from chatter_otel.reference.demo import build_chat_graph

if TYPE_CHECKING:
    from collections.abc import Iterator

APP_CORRELATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "app_correlation", default=None
)
log = logging.getLogger("tests.app")
TR = "traceresponse"


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _echo_server() -> tuple[ThreadingHTTPServer, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    class Echo(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture(scope="module")
def served(tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    echo, seen = _echo_server()
    echo_url = f"http://127.0.0.1:{echo.server_address[1]}/"
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db')}/app.db")
    graph = build_chat_graph()
    app = FastAPI()
    seen_app_var: list[str | None] = []

    @app.post("/chat")
    async def chat(body: dict[str, str]) -> dict[str, Any]:
        out = await graph.ainvoke({"messages": [HumanMessage(body["message"])]})
        async with engine.connect() as conn:
            one = (await conn.execute(text("SELECT 1"))).scalar_one()
        async with httpx.AsyncClient() as client:
            await client.get(echo_url)
        seen_app_var.append(APP_CORRELATION.get())
        log.warning("chat handled")
        return {"answer": out["messages"][-1].content, "one": one, "cid": current_correlation_id()}

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tel = configure(
        tracer_provider=provider, app=app, engines=[engine],
        correlation_context_var=APP_CORRELATION,
    )  # fmt: skip
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    captured = Captured()
    log.addHandler(captured)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield {
            "base": base, "exporter": exporter, "seen": seen, "logs": captured,
            "app_var": seen_app_var,
        }  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(10)
        log.removeHandler(captured)
        HTTPXClientInstrumentor().uninstrument()
        tel.shutdown()
        provider.shutdown()
        echo.shutdown()


@dataclass
class Reply:
    headers: dict[str, str]
    body: dict[str, Any]

    def json(self) -> dict[str, Any]:
        return self.body


def _post(served: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    # urllib, not httpx: the test's own client must not be traced (httpx is instrumented).
    served["exporter"].clear()
    served["logs"].records.clear()
    served["seen"].clear()
    req = urllib.request.Request(
        served["base"] + "/chat",
        data=json.dumps({"message": "weather in Oslo"}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return Reply({k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read()))


def _trace_spans(served: dict[str, Any], trace_hex: str) -> list[Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        spans = [
            s for s in served["exporter"].get_finished_spans()
            if f"{s.context.trace_id:032x}" == trace_hex
        ]  # fmt: skip
        if any(s.name == "POST /chat" for s in spans):
            return spans
        time.sleep(0.02)
    raise AssertionError("server span never finished")


def _check_everywhere(served: dict[str, Any], resp: Reply, cid: str) -> None:
    assert resp.headers["x-correlation-id"] == cid
    assert resp.json()["cid"] == cid
    m = re.fullmatch(
        r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", resp.headers["traceresponse"]
    )
    assert m, resp.headers["traceresponse"]
    assert int(m.group(3), 16) & 1  # sampled (the SDK may also set the random-trace-id flag)
    spans = _trace_spans(served, m.group(1))
    names = {s.name for s in spans}
    # the request, the graph run, the app's SQL and the outbound call: one trace
    assert {"POST /chat", "invoke_workflow chat", "chat chatter-local-1", "GET"} <= names
    assert any(s.attributes.get("db.system") == "sqlite" for s in spans)
    for s in spans:
        assert s.attributes.get("chatter.correlation.id") == cid, s.name
    server_span = next(s for s in spans if s.name == "POST /chat")
    assert f"{server_span.context.span_id:016x}" == m.group(2)
    # it reached the outbound call as W3C baggage, with the trace context
    (outbound,) = served["seen"]
    entries = dict(item.strip().split("=", 1) for item in outbound["baggage"].split(","))
    assert urllib.parse.unquote(entries["chatter.correlation.id"]) == cid  # W3C percent-encoding
    assert outbound["traceparent"].split("-")[1] == m.group(1)
    # the app's own context variable was set for the request
    assert served["app_var"][-1] == cid
    # the request's log line carries its ids
    (record,) = [r for r in served["logs"].records if r.getMessage() == "chat handled"]
    assert record.correlation_id == cid
    assert record.trace_id == m.group(1)
    assert re.fullmatch(r"[0-9a-f]{16}", record.span_id)


def test_valid_header_is_used_everywhere(served: dict[str, Any]) -> None:
    resp = _post(served, {"X-Correlation-ID": "req-2024.11:abc_DEF-9"})
    _check_everywhere(served, resp, "req-2024.11:abc_DEF-9")


def test_missing_header_gets_a_new_id(served: dict[str, Any]) -> None:
    resp = _post(served)
    cid = resp.headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", cid)
    _check_everywhere(served, resp, cid)


@pytest.mark.parametrize(
    "hostile",
    [
        "x" * 129,
        'quote"d',
        "tab\tinside",
        "semi;colon",
        "<script>",
        "baggage=evil,other=1",
        "ünïcode",
        "",
    ],
    ids=[
        "too-long",
        "quote",
        "tab",
        "semicolon",
        "markup",
        "baggage-injection",
        "non-ascii",
        "empty",
    ],
)
def test_hostile_header_is_replaced(served: dict[str, Any], hostile: str) -> None:
    resp = _post(served, {"X-Correlation-ID": hostile})
    cid = resp.headers["x-correlation-id"]
    assert cid != hostile and re.fullmatch(r"[0-9a-f]{32}", cid)
    _check_everywhere(served, resp, cid)


def test_crlf_never_reaches_a_header(served: dict[str, Any]) -> None:
    port = int(served["base"].rsplit(":", 1)[1])
    body = b'{"message": "hi"}'
    raw = (
        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Correlation-ID: abc\rInjected: yes\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        reply = s.recv(65536)
    # the server refuses the request, or answers without echoing anything injected
    assert b"Injected" not in reply


def test_id_from_w3c_baggage(served: dict[str, Any]) -> None:
    resp = _post(served, {"baggage": "chatter.correlation.id=upstream-77,other=x"})
    _check_everywhere(served, resp, "upstream-77")


def test_log_filter_outside_a_request() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    CorrelationLogFilter().filter(record)
    assert (record.trace_id, record.span_id, record.correlation_id) == ("", "", "")


@pytest.mark.parametrize("kind", ["getter", "context_var", "raising_getter"])
async def test_the_apps_own_source(kind: str) -> None:
    """Without a header or baggage, the app's own getter or context variable supplies the id."""
    from chatter_otel.correlation import CorrelationMiddleware

    own: contextvars.ContextVar[str | None] = contextvars.ContextVar("own", default=None)
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(current_correlation_id())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def boom() -> str:
        raise RuntimeError("app bug")

    options = {
        "getter": {"getter": lambda: "from-getter"},
        "context_var": {"context_var": own},
        "raising_getter": {"getter": boom},
    }[kind]
    mw = CorrelationMiddleware(app, **options)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    token = own.set("from-app-var")
    try:
        await mw({"type": "http", "headers": []}, receive, send)
    finally:
        own.reset(token)
    expected = {"getter": "from-getter", "context_var": "from-app-var"}.get(kind)
    cid = dict(sent[0]["headers"])[b"x-correlation-id"].decode()
    if expected:
        assert seen == [expected] and cid == expected
    else:  # a raising source is logged and a new id is made
        assert re.fullmatch(r"[0-9a-f]{32}", cid) and seen == [cid]
