"""Host apps shaped like the real backend the "fits a real host app" issue was tried on,
configured only as the README's "Use it in an app" says: its own correlation middleware and
ContextVar, its MonitoringService (float costs, float timestamps, its own metrics class), its
own event class and event manager, a tracker that records zero-usage workflows, ChatOpenAI on
an OpenAI-compatible endpoint (loopback), a streaming endpoint, configure() in the lifespan;
one that reports usage itself (its own de-duplication and cost rate); one that reads the body
before its middleware sets its id; and the same under zero-code (opentelemetry-instrument)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.middleware.base import BaseHTTPMiddleware

import chatter_otel
from chatter_otel import EventOptions, MonitoringOptions
from chatter_otel.sinks.forward import app_event_converter
from chatter_otel.sinks.monitoring import MonitoringService
from tests.test_host_app import AppCorrelation, request_id
from tests.test_host_services import (
    AppEvent,
    AppEvents,
    AppLLMMetrics,
    AppMonitoring,
    EventPriority,
)
from tests.test_host_startup import _get, _serve
from tests.test_zero_code import _instrumented

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path


def backend(model_url: str, exporter: InMemorySpanExporter, stream_usage: bool) -> Any:
    monitoring, events = AppMonitoring(), AppEvents()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def graph(streaming: bool) -> Any:
        llm = ChatOpenAI(model="gpt-4o-mini", base_url=model_url, api_key="k", max_retries=0,
                         streaming=streaming)  # fmt: skip

        async def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await llm.ainvoke(state["messages"])]}

        g = StateGraph(MessagesState)
        g.add_node("agent", agent)
        g.add_edge(START, "agent")
        return g.compile(name="chat")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # As the README says, from the lifespan: the app's own id, services and events.
        chatter_otel.configure(
            app=app, tracer_provider=provider, correlation_context_var=request_id,
            monitoring=MonitoringOptions(monitoring, llm_metrics=AppLLMMetrics,
                                         timestamps="epoch"),
            events=EventOptions(forward_to=events.emit, converter=app_event_converter(
                AppEvent, field_map={"session_id": "conversation_id"},
                enums={"priority": EventPriority}, constants={"source_system": "chatter-otel"},
            )),
            stream_usage=stream_usage, prices={},
        )  # fmt: skip
        yield
        chatter_otel.telemetry._current.shutdown()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(AppCorrelation)

    async def tracked(conversation: str, streaming: bool) -> str:
        wid = monitoring.start_workflow_tracking("u1", conversation)
        await events.emit(AppEvent("workflow_started", session_id=conversation))
        config = {"configurable": {"thread_id": conversation}}
        out = await graph(streaming).ainvoke({"messages": [HumanMessage("hello")]}, config)
        monitoring.update_workflow_metrics(wid, token_usage={"unknown": 0})
        monitoring.finish_workflow_tracking(wid)
        await events.emit(AppEvent("workflow_completed", session_id=conversation,
                                   data={"total_tokens": 0}))  # fmt: skip
        return str(out["messages"][-1].content)

    @app.get("/chat")
    async def chat() -> dict[str, str]:
        return {"answer": await tracked("conv-chat", streaming=False)}

    @app.get("/chat/stream")
    async def chat_stream() -> dict[str, str]:
        return {"answer": await tracked("conv-stream", streaming=True)}

    @app.get("/boom")
    async def boom() -> dict[str, str]:
        await tracked("conv-boom", streaming=False)
        raise RuntimeError("upstream model error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return monitoring.get_system_health()

    return app, monitoring, events


@pytest.mark.parametrize("stream_usage", [False, True], ids=["as-is", "stream-usage-opt-in"])
def test_the_host_backend_end_to_end(
    openai_server: Any, stream_usage: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    exporter = InMemorySpanExporter()
    app, monitoring, events = backend(openai_server.url, exporter, stream_usage)
    base, server, thread = _serve(app)
    try:
        seen: list[str] = []
        for path, header, status in (("/chat", None, 200), ("/chat", "req-9", 200),
                                     ("/chat", "req:7.a_b", 200), ("/boom", None, 500),
                                     ("/chat/stream", None, 200)):  # fmt: skip
            got, headers = _get(base + path, {"X-Correlation-ID": header} if header else None)
            assert got == status
            rid = headers["x-correlation-id"]
            # no header: ours, handed to the app as the request's header and adopted by it
            assert rid == header if header else re.fullmatch(r"[0-9a-f]{32}", rid)
            assert "traceresponse" in headers
            seen.append(rid)
        tel = chatter_otel.telemetry._current
        assert tel.force_flush()
        # ids match end to end: spans, events, monitoring entries, log lines
        ours = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_workflow")]
        assert sorted(s.attributes["chatter.correlation.id"] for s in ours) == sorted(seen)
        app_events = [e for e in events.seen if e.source_system == "app"]
        assert sorted({e.correlation_id for e in app_events if e.correlation_id}) == sorted(seen)
        assert all(isinstance(e.priority, EventPriority) for e in events.seen)
        logged = {r.correlation_id for r in caplog.records if r.name == "host.app"}  # type: ignore[attr-defined]
        assert logged == set(seen)
        # one monitoring entry and one set of workflow events per run, with the real tokens
        assert len(monitoring.workflows) == 5
        tokens = [w["tokens"] for w in monitoring.workflows.values()]
        completed = [e.data["total_tokens"] for e in app_events
                     if e.event_type == "workflow_completed"]  # fmt: skip
        assert len(completed) == 5 and completed[:4] == [30, 30, 30, 30] == tokens[:4]
        assert not [
            e
            for e in events.seen
            if e.source_system == "chatter-otel" and e.event_type.startswith("workflow")
        ]
        # the streamed call: usage asked for (opt-in), else missing (never 0) and said once
        warned = [r for r in caplog.records if "reported no token usage" in r.getMessage()]
        if stream_usage:
            assert tokens[4] == completed[4] == 30 and not warned
        else:
            assert tokens[4] == completed[4] == 0 and len(warned) == 1
            assert "gpt-4o-mini" in warned[0].getMessage()
        # the app's health call works, after a call without usage too
        got, _ = _get(base + "/health")
        assert got == 200
    finally:
        server.should_exit = True
        thread.join(10)
    asyncio.run(asyncio.sleep(0))


# -- an app that reports usage itself: fill, never add --------------------------------------

PRICES = {"gpt-4o-mini-2024-07-18": {"input_mtok": "0.15", "output_mtok": "0.60"}}
APP_RATE = 0.000025  # the app's own hard-coded cost per token


def reporting_backend(model_url: str, exporter: InMemorySpanExporter, reader: Any,
                      correct: bool) -> Any:  # fmt: skip
    """A host app whose model nodes return ``usage_metadata`` and whose tracker records it
    itself, with its own mistakes: it keeps only the last call's usage (2 calls made) and
    prices it at a hard-coded rate."""
    monitoring, events = AppMonitoring(), AppEvents()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=model_url, api_key="k", max_retries=0)

    async def draft(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("draft", draft)
    g.add_node("answer", draft)
    g.add_edge(START, "draft")
    g.add_edge("draft", "answer")
    graph = g.compile(name="chat")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chatter_otel.configure(
            app=app, tracer_provider=provider, meter_provider=MeterProvider([reader]),
            correlation_context_var=request_id,
            monitoring=MonitoringOptions(monitoring, llm_metrics=AppLLMMetrics,
                                         timestamps="epoch", correct_app_usage=correct),
            events=EventOptions(forward_to=events.emit, converter=app_event_converter(
                AppEvent, field_map={"session_id": "conversation_id"},
                enums={"priority": EventPriority}, constants={"source_system": "chatter-otel"},
            )),
            prices=PRICES,
        )  # fmt: skip
        yield
        chatter_otel.telemetry._current.shutdown()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(AppCorrelation)

    @app.get("/chat")
    async def chat() -> dict[str, Any]:
        wid = monitoring.start_workflow_tracking("u1", "conv-r")
        await events.emit(AppEvent("workflow_started", session_id="conv-r"))
        out = await graph.ainvoke({"messages": [HumanMessage("hello")]})
        tokens = out["messages"][-1].usage_metadata["total_tokens"]  # its de-duplication
        monitoring.update_workflow_metrics(wid, token_usage={"unknown": tokens})
        monitoring.finish_workflow_tracking(wid)
        data = {"tokens_used": tokens, "cost": tokens * APP_RATE}
        await events.emit(AppEvent("workflow_completed", session_id="conv-r", data=data))
        return {"workflow": wid}

    return app, monitoring, events


def _points(reader: Any, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [p for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics
            for m in sm.metrics if m.name == name for p in m.data.data_points]  # fmt: skip


@pytest.mark.parametrize("correct", [False, True], ids=["as-reported", "correct_app_usage"])
def test_an_app_that_reports_usage_itself_is_filled_never_added_to(
    openai_server: Any, correct: bool, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from chatter_otel import _safety

    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())  # "once" starts here
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    app, monitoring, events = reporting_backend(openai_server.url, exporter, reader, correct)
    base, server, thread = _serve(app)
    try:
        for _ in range(2):
            assert _get(base + "/chat")[0] == 200
        tel = chatter_otel.telemetry._current
        assert tel.force_flush()
        runs = [s for s in exporter.get_finished_spans() if s.name == "invoke_workflow chat"]
        assert len(runs) == 2
        measured = {int(s.attributes["chatter.usage.total_tokens"]) for s in runs}
        cost = {float(s.attributes["gen_ai.usage.cost.amount"]) for s in runs}
        assert measured == {60} and len(cost) == 1  # two calls of 30 tokens each, priced
        (measured_cost,) = cost
        assert measured_cost != pytest.approx(30 * APP_RATE)
        # one entry per run in the app's service, the app's numbers or (asked) the measured
        tokens = [w["tokens"] for w in monitoring.workflows.values()]
        assert tokens == ([60, 60] if correct else [30, 30])
        completed = [e.data for e in events.seen if e.event_type == "workflow_completed"]
        want = {"tokens_used": 60, "cost": measured_cost} if correct else {
            "tokens_used": 30, "cost": 30 * APP_RATE}  # fmt: skip
        assert completed == [want, want]  # nothing of ours added beside the app's keys
        assert not [e for e in events.seen if e.source_system == "chatter-otel"
                    and e.event_type.startswith("workflow")]  # fmt: skip
        # every LLM call once in the app's LLM metrics and in ours
        assert len(monitoring.ops) == 4
        usage = _points(reader, "gen_ai.client.token.usage")
        assert sum(p.sum for p in usage) == 120
        # each difference counted, by field and source; one log line per kind
        mismatch = {(p.attributes["chatter.usage.field"], p.attributes["chatter.usage.source"]):
                    p.value for p in _points(reader, "chatter.usage.app_mismatch")}  # fmt: skip
        assert mismatch == {("total_tokens", "monitoring"): 2, ("total_tokens", "events"): 2,
                            ("cost", "events"): 2}  # fmt: skip
        said = [r.getMessage() for r in caplog.records if "the app's own" in r.getMessage()]
        assert len(said) == 3, said
        assert any("total_tokens=30.0 for a run whose LLM calls measured 60" in m for m in said)
    finally:
        server.should_exit = True
        thread.join(10)
    asyncio.run(asyncio.sleep(0))


@dataclass
class NullableLLMMetrics:  # an app class that can say "no usage"
    provider: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    duration_ms: float
    cost_estimate: float


@dataclass
class FlaggedLLMMetrics(AppLLMMetrics):  # plain ints, and a flag of its own for no usage
    usage_missing: bool = False


@pytest.mark.parametrize(
    ("cls", "want", "says"),
    [
        (NullableLLMMetrics, (None, None), False),
        (FlaggedLLMMetrics, (0, 0), True),
        (AppLLMMetrics, (0, 0), True),
    ],
)
def test_a_streamed_call_without_usage_is_missing_in_the_app_s_llm_metrics(
    openai_server: Any, cls: type, want: tuple[Any, Any], says: bool,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Not 0/0 as if it had used nothing: None where the app's class admits it; else 0 with its
    own flag set where it has one, and one line saying how to see those calls as missing."""
    from chatter_otel import _safety

    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())
    monitoring = AppMonitoring()
    monitoring.record_llm_operation = monitoring.ops.append  # type: ignore[method-assign]
    builtin = MonitoringService()
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.url, api_key="k",
                     max_retries=0, streaming=True)  # fmt: skip
    for service, metrics_cls in ((monitoring, cls), (builtin, None)):
        tel = chatter_otel.configure(
            tracer_provider=TracerProvider(), set_global=False, prices={},
            monitoring=MonitoringOptions(service, llm_metrics=metrics_cls,
                                         timestamps="epoch"),
        )  # fmt: skip
        try:
            with chatter_otel.track_workflow("chat"):
                text = "".join(str(c.content) for c in llm.stream("hello"))
            assert text == openai_server.content and tel.force_flush()
        finally:
            tel.shutdown()
    (op,) = monitoring.ops
    assert type(op) is cls
    assert (op.input_tokens, op.output_tokens) == want
    assert getattr(op, "usage_missing", True) is True
    said = [r.getMessage() for r in caplog.records if "without None" in r.getMessage()]
    assert len(said) == (1 if says else 0), said
    # the built-in service counts the call, and says its tokens are unknown, not 0
    (model,) = builtin.get_workflow_stats()["models"].values()
    assert (model["calls"], model["calls_without_usage"], model["input_tokens"]) == (1, 1, 0)


class BodyLoggingCorrelation(BaseHTTPMiddleware):
    """An app middleware that reads the request body (to log it) before it sets its own id."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        body = await request.body()
        rid = request.headers.get("x-correlation-id") or uuid.uuid4().hex[:26].upper()
        token = request_id.set(rid)
        try:
            logging.getLogger("host.app").info("POST body of %d bytes", len(body))
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Correlation-ID"] = rid
        return response


@pytest.mark.parametrize("header", [None, "req-42"], ids=["no-header", "header"])
def test_one_id_from_the_first_byte_of_a_request(
    header: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The body is read (an ``http receive`` span) before the app's middleware sets its id:
    every span of the request, the app's log line and the response still carry one id."""
    caplog.set_level(logging.INFO)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()
    app.add_middleware(BodyLoggingCorrelation)

    @app.post("/chat")
    async def chat(request: Request) -> dict[str, Any]:
        return {"seen": (await request.json())["message"], "rid": request_id.get()}

    # The app wants the ASGI sub-spans (configure() leaves them out): it instruments itself
    # first, and configure() keeps that instrumentation.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    tel = chatter_otel.configure(app=app, tracer_provider=provider, set_global=False,
                                 correlation_context_var=request_id)  # fmt: skip
    base, server, thread = _serve(app)
    try:
        sent = {"Content-Type": "application/json"}
        if header:
            sent["X-Correlation-ID"] = header
        req = urllib.request.Request(base + "/chat", data=b'{"message": "hi"}', headers=sent)
        with urllib.request.urlopen(req, timeout=10) as resp:
            rid, answer = resp.headers["x-correlation-id"], json.loads(resp.read())
        assert rid == (header or answer["rid"]) == answer["rid"]  # the app's own id is it
        trace_id = resp.headers["traceresponse"].split("-")[1]
        deadline = time.monotonic() + 10
        while not any(s.parent is None for s in exporter.get_finished_spans()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        spans = [s for s in exporter.get_finished_spans()
                 if format(s.context.trace_id, "032x") == trace_id]  # fmt: skip
        assert "POST /chat http receive" in {s.name for s in spans}
        assert {s.name: s.attributes.get("chatter.correlation.id") for s in spans} == {
            s.name: rid for s in spans}  # fmt: skip
        (line,) = [r for r in caplog.records if r.name == "host.app"]
        assert line.correlation_id == rid  # type: ignore[attr-defined]
    finally:
        server.should_exit = True
        thread.join(10)
        tel.shutdown()


def test_configure_leaves_out_the_asgi_send_and_receive_spans() -> None:
    """configure(app=...) gives each request its server span without the ASGI ``http send``/
    ``http receive`` sub-spans: one per ASGI message, so a streamed answer made one per chunk."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await request.json()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            for i in range(5):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    tel = chatter_otel.configure(app=app, tracer_provider=provider, set_global=False)
    try:
        with TestClient(app) as client:
            assert client.post("/echo", json={"a": 1}).json() == {"a": 1}
            assert client.get("/stream").text.count("data:") == 5
    finally:
        tel.shutdown()
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["GET /stream", "POST /echo"]
    assert all(s.kind is SpanKind.SERVER for s in spans)


def test_a_correlation_id_in_the_graph_config_reaches_the_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``metadata={"correlation_id": ...}`` names the run's id: its spans carry it, and so
    does every log line written inside the run, sync and async."""
    caplog.set_level(logging.INFO)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tel = chatter_otel.configure(tracer_provider=provider, set_global=False)

    def node(state: MessagesState) -> dict[str, Any]:
        logging.getLogger("app.node").info("inside the node")
        return {}

    g = StateGraph(MessagesState)
    g.add_node("n", node)
    g.add_edge(START, "n")
    graph = g.compile(name="chat")
    try:
        graph.invoke({"messages": [HumanMessage("hi")]}, {"metadata": {"correlation_id": "meta-7"}})
        asyncio.run(graph.ainvoke({"messages": [HumanMessage("hi")]},
                                  {"metadata": {"correlation_id": "meta-8"}}))  # fmt: skip
        logging.getLogger("app.node").info("outside any run")
        spans = exporter.get_finished_spans()
    finally:
        tel.shutdown()
    lines = [(r.getMessage(), getattr(r, "correlation_id", None)) for r in caplog.records
             if r.name == "app.node"]  # fmt: skip
    assert lines == [("inside the node", "meta-7"), ("inside the node", "meta-8"),
                     ("outside any run", "")]  # fmt: skip
    by_trace: dict[int, set[Any]] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, set()).add(s.attributes["chatter.correlation.id"])
    assert sorted(by_trace.values(), key=str) == [{"meta-7"}, {"meta-8"}]


ZERO_CODE_HOST_APP = """
import contextvars, json, logging, uuid
from fastapi import FastAPI
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from starlette.middleware.base import BaseHTTPMiddleware
from chatter_otel import telemetry
from chatter_otel.correlation import CorrelationMiddleware
from chatter_otel.reference.demo import build_chat_graph

request_id = contextvars.ContextVar("request_id", default=None)  # the app's own
logging.basicConfig(level=logging.INFO, format="%(message)s cid=%(correlation_id)s")
log = logging.getLogger("host")

class AppCorrelation(BaseHTTPMiddleware):  # the app's: its header, else an id of its own
    async def dispatch(self, request, call_next):
        await request.body()  # read before it sets its id (a request logger, say)
        rid = request.headers.get("x-correlation-id") or uuid.uuid4().hex[:26].upper()
        token = request_id.set(rid)
        try:
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Correlation-ID"] = rid
        return response

app = FastAPI()
app.add_middleware(AppCorrelation)
app.add_middleware(CorrelationMiddleware, context_var=request_id)  # the README's one line
graph = build_chat_graph()

@app.post("/chat")
async def chat(body: dict):
    out = await graph.ainvoke({"messages": [HumanMessage(body["message"])]})
    log.info("answered")
    return {"answer": out["messages"][-1].content}

with TestClient(app) as client:
    got = []
    for header in (None, "req-42"):
        r = client.post("/chat", json={"message": "weather in Rome"},
                        headers={"X-Correlation-ID": header} if header else {})
        got.append({"id": r.headers["x-correlation-id"],
                    "trace": r.headers["traceresponse"].split("-")[1]})
telemetry._current.force_flush()
print(json.dumps(got))
"""


def test_zero_code_with_the_app_s_context_var_gives_one_id_per_request(tmp_path: Path) -> None:
    """opentelemetry-instrument and the one line the README shows, in an app with its own
    correlation middleware and ContextVar: with and without a header, every span of a request,
    its log lines and its response carry the same id."""
    script = tmp_path / "app.py"
    script.write_text(ZERO_CODE_HOST_APP)
    store = tmp_path / "traces.db"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "chatter_local", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_LOGS_EXPORTER": "none", "OTEL_SERVICE_NAME": "zero-code-host",
           "CHATTER_OTEL_TRACE_STORE": str(store)}  # fmt: skip
    proc = _instrumented(script, env)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got[1]["id"] == "req-42" and got[0]["id"] != got[1]["id"]
    from chatter_otel import LocalTraceStore

    local = LocalTraceStore(store)
    for request in got:
        spans = local.trace(request["trace"])
        names = {r.name for r in spans}
        assert {"POST /chat", "POST /chat http receive", "invoke_workflow chat"} <= names
        wrong = {r.name: r.attributes.get("chatter.correlation.id") for r in spans
                 if r.attributes.get("chatter.correlation.id") != request["id"]}  # fmt: skip
        assert not wrong, (request, wrong)
    answered = [line for line in proc.stderr.splitlines() if line.startswith("answered")]
    assert answered == [f"answered cid={r['id']}" for r in got]
