"""One host app shaped like the real backend the "fits a real host app" issue was tried on,
configured only as the README's "Use it in an app" says: its own correlation middleware and
ContextVar, its MonitoringService (float costs, float timestamps, its own metrics class), its
own event class and event manager, a tracker that records zero-usage workflows, ChatOpenAI on
an OpenAI-compatible endpoint (loopback), a streaming endpoint, configure() in the lifespan."""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import chatter_otel
from chatter_otel import EventOptions, MonitoringOptions
from chatter_otel.sinks.forward import app_event_converter
from tests.test_host_app import AppCorrelation, request_id
from tests.test_host_services import (
    AppEvent,
    AppEvents,
    AppLLMMetrics,
    AppMonitoring,
    EventPriority,
)
from tests.test_host_startup import _get, _serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


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
            assert rid == header if header else re.fullmatch(r"[0-9A-F]{26}", rid)
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
