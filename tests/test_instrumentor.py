"""Instrumentor lifecycle, bounded state, and faults that must never reach the app."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from chatter_otel import LangGraphInstrumentor
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LocalChatModel

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}


def test_entry_point_is_registered() -> None:
    eps = entry_points(group="opentelemetry_instrumentor")
    (ep,) = [e for e in eps if e.name == "langgraph"]
    assert ep.load() is LangGraphInstrumentor


def test_instrument_is_idempotent(instrument: Any) -> None:
    spans = instrument()
    LangGraphInstrumentor().instrument()  # a second call: no second handler, no double spans
    build_chat_graph().invoke(Q)
    assert len(spans.named("invoke_workflow chat")) == 1
    assert len(spans.named("chat chatter-local-1")) == 2


def test_uninstrument_stops_spans_and_reinstrument_works(instrument: Any) -> None:
    spans = instrument()
    graph = build_chat_graph()
    graph.invoke(Q)
    assert len(spans.all) == 7
    LangGraphInstrumentor().uninstrument()
    spans.clear()
    out = graph.invoke(Q)
    assert out["messages"][-1].content.startswith("Here is what I found")
    assert spans.all == []
    spans2 = instrument()
    graph.invoke(Q)
    assert len(spans2.all) == 7


def test_registry_is_bounded_and_orphans_end_with_error_type(
    instrument: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spans = instrument(max_runs=16)
    model = LocalChatModel()
    # Streams started and never finished or closed: their runs never end.
    pending = [model.stream(f"question {i}") for i in range(40)]
    for gen in pending:
        next(gen)
    handler = LangGraphInstrumentor().handler
    assert handler is not None
    assert len(handler._runs) <= 16
    orphans = [s for s in spans.all if s.attributes.get("error.type") == "chatter.orphaned"]
    assert len(orphans) == 40 - 16
    assert all(s.status.status_code is StatusCode.ERROR for s in orphans)
    assert "never finished" in caplog.text
    for gen in pending:
        gen.close()


@pytest.mark.internal_errors
def test_internal_fault_never_reaches_the_app(
    spans: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = LangGraphInstrumentor().handler

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("pricing exploded")

    monkeypatch.setattr(handler.pricer, "cost", broken)
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        out = build_chat_graph().invoke(Q)
    assert out["messages"][-1].content == "Here is what I found: Paris: 18°C, light rain"
    assert "internal error" in caplog.text


async def test_handler_runs_on_the_event_loop_thread(spans: Any) -> None:
    handler = LangGraphInstrumentor().handler
    threads: set[int] = set()
    orig = handler.on_chat_model_start

    def spy(*a: Any, **k: Any) -> Any:
        threads.add(threading.get_ident())
        return orig(*a, **k)

    handler.on_chat_model_start = spy  # type: ignore[method-assign]
    await build_chat_graph().ainvoke(Q)
    assert threads == {threading.get_ident()}  # no executor hop in async code


def test_sampled_out_runs_still_work(instrument: Any) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    LangGraphInstrumentor().instrument(tracer_provider=provider)
    try:
        from chatter_otel import track_workflow

        with track_workflow("t") as run:
            out = build_chat_graph().invoke(Q)
        assert out["messages"][-1].content.startswith("Here is what I found")
        assert exporter.get_finished_spans() == ()
        # usage is still handed back to the app when spans are not recorded
        assert run.usage.llm_calls == 2 and run.usage.total_tokens is not None
    finally:
        LangGraphInstrumentor().uninstrument()


def test_bad_settings_fall_back_with_a_warning(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CHATTER_OTEL_MAX_RUNS", "lots")
    monkeypatch.setenv("CHATTER_OTEL_MAX_CONTENT_LENGTH", "-3")
    monkeypatch.setenv("CHATTER_OTEL_PRICES_FILE", "/nonexistent/prices.json")
    instrument()
    s = LangGraphInstrumentor().handler.settings
    assert s.max_runs == 10_000 and s.max_content_length == 16_384 and dict(s.prices) == {}
    for name in ("CHATTER_OTEL_MAX_RUNS", "CHATTER_OTEL_MAX_CONTENT_LENGTH", "PRICES_FILE"):
        assert name in caplog.text


def test_prices_file_from_env(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"chatter-local-1": {"input_mtok": 1, "output_mtok": 2}}')
    monkeypatch.setenv("CHATTER_OTEL_PRICES_FILE", str(path))
    spans = instrument()
    LocalChatModel().invoke("a b c")
    a = spans.one("chat chatter-local-1").attributes
    expected = (a["gen_ai.usage.input_tokens"] * 1 + a["gen_ai.usage.output_tokens"] * 2) / 1e6
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(expected)


def test_many_concurrent_async_runs_leave_nothing_behind(spans: Any) -> None:
    graph = build_chat_graph()

    async def main() -> None:
        await asyncio.gather(*(graph.ainvoke(Q) for _ in range(30)))

    asyncio.run(main())
    handler = LangGraphInstrumentor().handler
    assert len(handler._runs) == 0 and len(handler._graphs) == 0
    assert len(spans.named("invoke_workflow chat")) == 30


LATE_IMPORT = """
import json, sys
import langgraph.graph, langchain_core.messages  # what the app imported before instrumenting
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from chatter_otel import LangGraphInstrumentor

LATE = ("langchain_core.language_models.chat_models", "langchain_openai", "openai")
instrumentor = LangGraphInstrumentor()
instrumentor.instrument(tracer_provider=TracerProvider(), stream_usage=True)
imported_by_instrument = [m for m in LATE if m in sys.modules]
if sys.argv[1] == "off-before-import":
    instrumentor.uninstrument()

from chatter_otel.reference.local_model import LocalChatModel  # imports the chat models now

OPENAI = sys.argv[2] == "openai"  # installed (the package's dev set; not its bare install)
if OPENAI:
    from langchain_openai import ChatOpenAI  # and the openai SDK with its embeddings
    from openai.resources.embeddings import Embeddings


class Probe(LocalChatModel):
    def _generate(self, *args, **kwargs):
        seen.append(getattr(trace.get_current_span(), "name", None))
        return super()._generate(*args, **kwargs)


def wrapped():
    late = [ChatOpenAI._should_stream_usage, Embeddings.create] if OPENAI else []
    return [hasattr(f, "__wrapped__") for f in [Probe._generate_with_cache, *late]]


seen = []
Probe().invoke("hi")
first = wrapped()
instrumentor.uninstrument()
Probe().invoke("hi")
off = wrapped()
instrumentor.instrument(tracer_provider=TracerProvider(), stream_usage=True)
Probe().invoke("hi")
print(json.dumps({"imported_by_instrument": imported_by_instrument, "seen": seen,
                  "wrapped": [first, off, wrapped()]}))
"""


@pytest.mark.parametrize("case", ["on", "off-before-import"])
def test_libraries_are_wrapped_when_the_app_imports_them(case: str) -> None:
    """Instrumenting imports no LangChain chat-model module, langchain-openai or openai SDK the
    app has not imported; when the app imports them later they are wrapped then: the provider
    call runs under our chat span (the mark a provider instrumentation beside ours reads),
    OpenAI models are asked for streamed usage, embeddings calls are traced. Uninstrumented
    before that import, nothing is wrapped until instrumented again."""
    # Without langchain-openai (the package installed without its extras: scripts/test-wheel.sh)
    # the chat models alone.
    openai = importlib.util.find_spec("langchain_openai") is not None
    out = subprocess.run([sys.executable, "-c", LATE_IMPORT, case, "openai" if openai else "-"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported_by_instrument"] == []
    on = case == "on"
    assert result["seen"] == ["chat chatter-local-1" if on else None, None,
                              "chat chatter-local-1"]  # fmt: skip
    n = 3 if openai else 1
    assert result["wrapped"] == [[on] * n, [False] * n, [True] * n]
