"""Beside a provider instrumentation, each LLM call is recorded once.

A real ``ChatOpenAI`` against the loopback server, with ``opentelemetry-instrumentation-openai-v2``
or OpenLLMetry's ``opentelemetry-instrumentation-openai`` instrumenting the openai client on the
same tracer and meter providers. OpenLLMetry's honours the suppression key we set: one chat
span per call, tokens once in every metric. openai-v2 2.4b0 knows no suppression: its span nests
under our chat span, and its token metric, in its own instrumentation scope, counts the call
again (the dashboard reads our scope). The ledger and the app's rows count each call once;
sync, async and streamed; a stream the app stops reading leaves no context behind.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import configure
from chatter_otel.persistence import LEDGER, UsagePersistence
from chatter_otel.reference.demo import build_chat_graph
from tests.conftest import token_sum
from tests.test_persistence import Host, database

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["database"]  # the fixture, parametrized over SQLite and PostgreSQL

OURS = "chatter_otel"
V2 = "opentelemetry.util.genai.handler"  # openai-v2 2.4b0 records through util-genai
TRACELOOP = "opentelemetry.instrumentation.openai"  # OpenLLMetry: ".v1" after it
HTTPX = "opentelemetry.instrumentation.httpx"
TOKENS = 30  # the loopback server's usage: 23 input + 7 output


def _model(server: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=server.url, api_key="sk-loopback",
                      max_retries=0, **kw)  # fmt: skip


def _provider_instrumentor(which: str) -> Any:
    if which == "openai-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    else:
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor
    return OpenAIInstrumentor()


class Setup:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])

    def chat_spans(self) -> list[Any]:
        """The CLIENT spans but the HTTP client's (configure turns httpx's on)."""
        spans = self.exporter.get_finished_spans()
        client = trace.SpanKind.CLIENT
        return [s for s in spans if s.kind is client and s.instrumentation_scope.name != HTTPX]

    def http_spans(self) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans()
                if s.instrumentation_scope.name == HTTPX]  # fmt: skip

    def token_sum(self, scope: str | None = None) -> int:
        return token_sum(self.reader, scope)


@pytest.fixture(params=["openai-v2", "openllmetry"])
def both(request: Any) -> Iterator[tuple[Setup, Any, str]]:
    """Ours (``configure``) and the provider instrumentation, on the same providers."""
    s = Setup()
    tel = configure(tracer_provider=s.provider, meter_provider=s.meters, set_global=False,
                    prices={})  # fmt: skip
    provider_inst = _provider_instrumentor(request.param)
    provider_inst.instrument(tracer_provider=s.provider, meter_provider=s.meters)
    try:
        yield s, tel, request.param
    finally:
        provider_inst.uninstrument()
        tel.shutdown()


def _assert_one_chat(s: Setup, which: str, calls: int) -> None:
    """``calls`` chat spans of ours; openai-v2's own, one under each; OpenLLMetry's none."""
    spans = s.chat_spans()
    ours = [sp for sp in spans if sp.instrumentation_scope.name == OURS]
    assert [sp.name for sp in ours] == ["chat gpt-4o-mini"] * calls
    for sp in ours:
        assert sp.attributes["gen_ai.usage.input_tokens"] == 23
    theirs = [sp for sp in spans if sp.instrumentation_scope.name != OURS]
    if which == "openllmetry":
        assert theirs == []
        return
    # the HTTP request of each call nests under the chat span (openai-v2's, under ours)
    parents = {sp.context.span_id for sp in spans}
    assert len(s.http_spans()) == calls
    assert all(h.parent.span_id in parents for h in s.http_spans())
    assert len(theirs) == calls
    assert {sp.instrumentation_scope.name for sp in theirs} == {V2}
    by_id = {sp.context.span_id: sp for sp in ours}
    assert {by_id[sp.parent.span_id].context.trace_id for sp in theirs} == {
        sp.context.trace_id for sp in ours
    }  # each nests under the chat span of its own call


def _assert_tokens_once(s: Setup, which: str, calls: int) -> None:
    assert s.token_sum(OURS) == calls * TOKENS
    # OpenLLMetry's records nothing for a suppressed call; openai-v2 counts it in its scope
    assert s.token_sum() == calls * TOKENS * (2 if which == "openai-v2" else 1)


def test_the_provider_instrumentation_is_live(both: Any, openai_server: Any) -> None:
    """The control: the openai client called directly (no LangChain) is recorded by the
    provider instrumentation, so its absence below is our doing."""
    s, _, which = both
    client = openai.OpenAI(base_url=openai_server.url, api_key="sk-loopback", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    (span,) = s.chat_spans()
    assert span.instrumentation_scope.name.startswith(V2 if which == "openai-v2" else TRACELOOP)
    assert s.token_sum() == TOKENS


def test_invoke_and_ainvoke_are_one_chat_span(both: Any, openai_server: Any) -> None:
    s, tel, which = both
    model = _model(openai_server)
    model.invoke("hi")
    asyncio.run(model.ainvoke("hi"))
    _assert_one_chat(s, which, 2)
    assert tel.force_flush()
    _assert_tokens_once(s, which, 2)


def test_streams_are_one_chat_span(both: Any, openai_server: Any) -> None:
    s, tel, which = both
    model = _model(openai_server, stream_usage=True)
    current = []
    for _ in model.stream("hi"):
        current.append(trace.get_current_span())  # the app's code between chunks

    async def consume() -> None:
        async for _ in model.astream("hi"):
            current.append(trace.get_current_span())

    asyncio.run(consume())
    graph = build_chat_graph(_model(openai_server, streaming=True, stream_usage=True))
    graph.invoke({"messages": [("user", "hi")]})  # streams inside invoke
    _assert_one_chat(s, which, 3)
    assert current and all(not span.get_span_context().is_valid for span in current)
    assert tel.force_flush()
    _assert_tokens_once(s, which, 3)


def test_a_stream_the_app_stops_reading_leaves_no_context(
    both: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s, _, _ = both
    tracer = s.provider.get_tracer("app")
    with caplog.at_level(logging.ERROR), tracer.start_as_current_span("request") as request:
        stream = _model(openai_server, stream_usage=True).stream("hi")
        next(stream)
        assert trace.get_current_span() is request
        stream.close()
        assert trace.get_current_span() is request
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert "Failed to detach context" not in caplog.text
    (chat,) = [sp for sp in s.chat_spans() if sp.instrumentation_scope.name == OURS]
    assert chat.parent.span_id == request.get_span_context().span_id


async def test_tokens_once_in_the_ledger_and_the_rows(
    database: str, tmp_path: Any, openai_server: Any
) -> None:
    """Through ``configure`` with persistence and openai-v2 beside it: one ledger row per
    call, the message and the conversation at the call's tokens, the metric at the same."""
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

    s = Setup()
    host = Host(database)
    await host.setup()
    persistence = UsagePersistence(database, spool_path=tmp_path / "spool.db")
    tel = configure(tracer_provider=s.provider, meter_provider=s.meters, set_global=False,
                    persistence=persistence, prices={})  # fmt: skip
    v2 = OpenAIInstrumentor()
    v2.instrument(tracer_provider=s.provider, meter_provider=s.meters)
    try:
        host.graph = build_chat_graph(_model(openai_server))
        cid = await host.new_conversation()
        for _ in range(3):
            await host.chat(cid, "weather?")
        assert await asyncio.to_thread(persistence.flush, 30), persistence.stats
        assert tel.force_flush()
        rows = await host.rows(LEDGER)
        assert len(rows) == 3 and {r.total_tokens for r in rows} == {TOKENS}
        messages = await host.messages(cid)
        assert sorted(m.total_tokens for m in messages) == [TOKENS] * 3
        assert (await host.conversation(cid)).total_tokens == 3 * TOKENS
        assert s.token_sum(OURS) == 3 * TOKENS
        _assert_one_chat(s, "openai-v2", 3)
    finally:
        v2.uninstrument()
        tel.shutdown()
        await host.engine.dispose()
