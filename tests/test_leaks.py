"""Nothing leaves that should not: the served reference app, a loopback model server, real OTLP
export and the local store.

* capture off: a model server's error body (a marker) is in no exported span, whichever
  instrumentation made it (the FastAPI server span included); the opt-in lets it through;
* inbound baggage is not forwarded to the model server, except the correlation id and the keys
  the app allows;
* hostile ``traceparent``/``tracestate``/``baggage`` never reach the logs raw;
* one correlation-id character set everywhere; bidi and control characters in no id;
* one ``traceresponse`` header per response, a 500 included.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn
from langchain_openai import ChatOpenAI

from chatter_otel import track_workflow
from chatter_otel.correlation import is_valid_correlation_id
from chatter_otel.reference.app import create_app
from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent
from chatter_otel.sinks.validation import InvalidEvent, validate_event

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import FakeOpenAI, Received

MARKER = "SECRET-PROMPT-ECHO-7f3a"
_ENV = ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "CHATTER_OTEL_CAPTURE_EXCEPTION_TEXT",
        "OTEL_TRACES_EXPORTER", "CHATTER_OTEL_PROPAGATE_BAGGAGE_KEYS")  # fmt: skip


class Served:
    """The app under uvicorn on a loopback port, its lifespan run."""

    def __init__(self, app: Any) -> None:
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)  # fmt: skip
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:  # fmt: skip
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
           openai_server: FakeOpenAI, otlp_http: Received) -> Iterator[Any]:  # fmt: skip
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_http.endpoint)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    started: list[Served] = []

    def serve(**options: Any) -> Served:
        model = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.url, api_key="k",
                           max_retries=0)  # fmt: skip
        app = create_app(database_url=f"sqlite+aiosqlite:///{tmp_path}/app.db", model=model,
                         exporter="local,otlp", trace_store=str(tmp_path / "traces.db"),
                         set_global=False, **options)  # fmt: skip
        s = Served(app)
        started.append(s)
        return s

    yield serve
    for s in started:
        s.close()


def _exported_bytes(tmp_path: Any, otlp: Received) -> bytes:
    """Every byte that left: the OTLP requests and the local store's files."""
    out = b"".join(req.SerializeToString() for req in otlp.requests)
    for path in tmp_path.glob("traces.db*"):
        out += path.read_bytes()
    return out


@pytest.mark.parametrize("opt_in", [False, True], ids=["capture-off", "exception-text-opt-in"])
def test_a_model_error_body_leaves_on_no_span_with_capture_off(
    served: Any, openai_server: FakeOpenAI, otlp_http: Received, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch, opt_in: bool,
) -> None:  # fmt: skip
    if opt_in:
        monkeypatch.setenv("CHATTER_OTEL_CAPTURE_EXCEPTION_TEXT", "true")
    openai_server.status = 500
    openai_server.error_message = f"upstream echoed your prompt: {MARKER}"
    app = served()
    status, _, _ = app.request("POST", "/chat", b'{"message": "hello"}')
    assert status == 500
    assert app.app.state.telemetry.force_flush()
    spans = otlp_http.wait_for(1)
    server = [s for _, s in spans if s.name == "POST /chat"]
    assert len(server) == 1 and server[0].status.code == 2  # ERROR
    (event,) = [e for e in server[0].events if e.name == "exception"]
    attrs = {a.key: a.value.string_value for a in event.attributes}
    assert attrs["exception.type"] == "langchain_openai.chat_models.base.OpenAIAPIError"
    if opt_in:  # the app asked for exception text: it is there
        assert MARKER in attrs["exception.message"]
        return
    assert "exception.message" not in attrs and "exception.stacktrace" not in attrs
    assert MARKER not in server[0].status.message
    assert MARKER.encode() not in _exported_bytes(tmp_path, otlp_http)


def test_inbound_baggage_is_not_forwarded_to_the_model(
    served: Any, openai_server: FakeOpenAI
) -> None:
    app = served(propagate_baggage_keys=["tenant"])
    hostile = "evil=%3Cscript%3E,user.id=%3Cimg%20src%3Dx%3E,tenant=acme"
    status, _, _ = app.request("POST", "/chat", b'{"message": "hello"}',
                               {"baggage": hostile, "X-Correlation-ID": "req-42"})  # fmt: skip
    assert status == 200
    sent = openai_server.headers[-1]
    assert "traceparent" in sent
    entries = dict(e.split("=", 1) for e in sent["baggage"].split(","))
    assert entries == {"chatter.correlation.id": "req-42", "tenant": "acme"}


def test_hostile_trace_headers_never_reach_the_logs_raw(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = served()
    hostile_state = "<script>=x," + "a" * 5000 + "=\x1b[2J\x1b[31mFAKE LOG LINE"
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    for _ in range(20):
        # http.client refuses control characters in headers; a raw request sends them as is
        with socket.create_connection(("127.0.0.1", int(app.base.rsplit(":", 1)[1]))) as sock:
            sock.sendall(
                f"GET /healthz HTTP/1.1\r\nHost: x\r\ntraceparent: {parent}\r\n"
                f"tracestate: {hostile_state}\r\nbaggage: k=<b>\x1b[2J,{'z' * 9000}\r\n"
                f"Connection: close\r\n\r\n".encode("latin-1")
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    otel = [r for r in caplog.records if r.name.startswith("opentelemetry.")]
    assert otel, "the API logged nothing about the hostile headers"
    for record in otel:
        line = record.getMessage()
        assert "<script>" not in line and "\x1b" not in line and "FAKE LOG LINE" not in line
        assert len(line) < 600
    per_kind: dict[str, int] = {}
    for record in otel:
        per_kind[str(record.msg)] = per_kind.get(str(record.msg), 0) + 1
    assert max(per_kind.values()) == 1  # each kind of line once a minute, not per request


VALID = ["0f8fad5b-d9cb-469f-a165-70867728950e", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "req-7",
         "svc:42.a_b", "x" * 128]  # fmt: skip
INVALID = ["x/../../etc/passwd", "x admin = true", "a@b", "a+b", "a=b", "a b", "ab\u202e",
           "\u202eab", "é", "", "x" * 129, "a\r\nb", "<script>"]  # fmt: skip


@pytest.mark.parametrize("value", VALID)
def test_one_correlation_id_set_accepts(value: str) -> None:
    assert is_valid_correlation_id(value)
    validate_event(UnifiedEvent(category=EventCategory.WORKFLOW, event_type="x",
                                correlation_id=value))  # fmt: skip


@pytest.mark.parametrize("value", INVALID)
def test_one_correlation_id_set_refuses_everywhere(value: str) -> None:
    assert not is_valid_correlation_id(value)
    with pytest.raises(InvalidEvent):
        validate_event(UnifiedEvent(category=EventCategory.WORKFLOW, event_type="x",
                                    correlation_id=value))  # fmt: skip
    with track_workflow("turn", correlation_id=value) as run:
        pass
    assert run.correlation_id != value


def test_the_header_takes_the_same_set(served: Any) -> None:
    app = served()
    for value in [*VALID, "x/../../etc/passwd", "x admin = true", "a@b", "a+b=c"]:
        _, headers, _ = app.request("GET", "/healthz", None, {"X-Correlation-ID": value})
        echoed = headers["x-correlation-id"]
        assert (echoed == value) is is_valid_correlation_id(value)
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", echoed)


@pytest.mark.parametrize("value", ["\u202eadmin", "ab\u200f", "a\tb", "a\x00b", "<img>"])
def test_app_ids_refuse_bidi_and_control_characters(value: str) -> None:
    with track_workflow("turn", user_id=value, conversation_id=value) as run:
        pass
    assert run.ids.user_id is None and run.ids.conversation_id is None
    for field in ("user_id", "conversation_id"):
        with pytest.raises(InvalidEvent, match=field):
            validate_event(UnifiedEvent(category=EventCategory.WORKFLOW, event_type="x",
                                        **{field: value}))  # fmt: skip


def test_one_traceresponse_header_per_response(served: Any, openai_server: FakeOpenAI) -> None:
    app = served()
    _, ok, _ = app.request("GET", "/healthz")
    openai_server.status = 500
    status, failed, _ = app.request("POST", "/chat", b'{"message": "hello"}')
    assert status == 500
    for headers in (ok, failed):
        values = headers.get_all("traceresponse")
        assert values is not None and len(values) == 1, values
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", values[0])
        assert len(headers.get_all("x-correlation-id")) == 1


def test_the_reference_app_starts_with_its_database_down(tmp_path: Any) -> None:
    """PostgreSQL behind a proxy that is cut: the app starts, health answers, a chat gets 503
    with a clear body; the database comes back: the schema is made, chats work."""
    from tests.test_persistence import PG, _pg_admin, _Proxy

    name = f"chatter_down_{int(time.time() * 1000) % 10**9}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    proxy = _Proxy()
    proxy.cut()
    url = PG.format(db=name).replace(f":{proxy.target}/", f":{proxy.port}/")
    started = time.monotonic()
    app = Served(create_app(database_url=url, exporter="none", set_global=False))
    try:
        assert time.monotonic() - started < 15
        assert app.request("GET", "/healthz")[0] == 200
        status, _, body = app.request("POST", "/chat", b'{"message": "hello"}')
        assert status == 503 and b"the database is unavailable" in body
        proxy.restore()
        for _ in range(100):
            status, _, body = app.request("POST", "/chat", b'{"message": "hello"}')
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, body
    finally:
        app.close()
        proxy.close()
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
