"""Faults inside the instrumentation or its sinks never cost a span, a record or a roll-up;
and a forked child's sinks all work."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, select

from chatter_otel import LangGraphInstrumentor, configure, track_workflow
from chatter_otel.persistence import LEDGER, UsagePersistence
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.sinks.monitoring import MonitoringService
from tests.forking import in_forked_child

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
TREE = [
    ("invoke_workflow t", None),
    ("invoke_workflow chat", "invoke_workflow t"),
    ("invoke_node agent", "invoke_workflow chat"),
    ("invoke_node tools", "invoke_workflow chat"),
    ("chat chatter-local-1", "invoke_node agent"),
    ("execute_tool get_weather", "invoke_node tools"),
]


def _tree(spans: list[Any]) -> list[tuple[str, str | None]]:
    by_id = {s.context.span_id: s for s in spans}
    out = set()
    for s in spans:
        parent = by_id.get(s.parent.span_id) if s.parent is not None else None
        out.add((s.name, parent.name if parent is not None else None))
    return sorted(out, key=lambda p: (p[1] or "", p[0]))


def _expect_whole_tree(spans: list[Any]) -> None:
    assert len(spans) == 8, [s.name for s in spans]  # 1 + 1 workflows, 3 nodes, 2 chats, 1 tool
    assert all(s.end_time is not None for s in spans)
    assert _tree(spans) == sorted(TREE, key=lambda p: (p[1] or "", p[0]))
    assert len({s.context.trace_id for s in spans}) == 1


class Boom(RuntimeError):
    pass


def _raise(*_a: Any, **_k: Any) -> Any:
    raise Boom("sink exploded")


class RaisingBus:
    def publish(self, event: Any) -> None:
        raise Boom("bus exploded")


class RaisingService(MonitoringService):
    def record_llm_operation(self, metrics: Any) -> None:
        raise Boom("monitoring exploded")


class RaisingAnalytics:
    def record(self, completion: Any) -> None:
        raise Boom("analytics exploded")


@pytest.fixture
def telemetry() -> Any:
    made: list[Any] = []

    def make(**kw: Any) -> tuple[Any, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tel = configure(tracer_provider=provider, prices=LOCAL_MODEL_PRICES, **kw)
        made.append(tel)
        return tel, exporter

    yield make
    for tel in made:
        tel.shutdown()


@pytest.mark.internal_errors
@pytest.mark.parametrize(
    "where", ["pricer", "redactor", "bus", "monitoring", "analytics", "push", "ledger"]
)
async def test_a_raising_step_leaves_every_span_ended_and_exported(
    telemetry: Any, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    kw: dict[str, Any] = {}
    if where == "push":
        kw = {"record_completion": _raise}
    elif where == "ledger":
        ledger = UsagePersistence(f"sqlite+aiosqlite:///{tmp_path}/app.db",
                                  spool_path=tmp_path / "spool.db")  # fmt: skip
        monkeypatch.setattr(ledger, "submit", _raise)
        kw = {"persistence": ledger}
    if where == "redactor":
        kw = {"capture_content": True, "redact": _raise}
    elif where == "bus":
        kw = {"events": RaisingBus()}
    elif where == "monitoring":
        kw = {"monitoring": RaisingService()}
    elif where == "analytics":
        kw = {"analytics": RaisingAnalytics()}
    tel, exporter = telemetry(**kw)
    if where == "pricer":
        handler = LangGraphInstrumentor().handler
        assert handler is not None
        monkeypatch.setattr(handler.pricer, "cost", _raise)
    async with track_workflow("t", conversation_id="c-1") as run:
        out = await build_chat_graph().ainvoke(Q)
    assert out["messages"][-1].content == "Here is what I found: Paris: 18°C, light rain"
    assert tel.force_flush()
    spans = list(exporter.get_finished_spans())
    _expect_whole_tree(spans)
    # the roll-ups are whole too: both calls counted, tokens summed
    assert (run.usage.llm_calls, run.usage.tool_calls, run.usage.total_tokens) == (2, 1, 27)
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert [s.attributes["gen_ai.usage.input_tokens"] for s in chats] == [6, 10]
    if where == "pricer":  # cost absent, never 0
        assert run.usage.cost is None
        assert all("gen_ai.usage.cost.amount" not in s.attributes for s in chats)
    if where == "redactor":  # content dropped, never recorded unredacted
        assert all("Paris" not in s.attributes.get("gen_ai.input.messages", "") for s in chats)
        assert all("Paris" not in s.attributes.get("gen_ai.output.messages", "") for s in chats)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_has_working_sinks(telemetry: Any, tmp_path: Any) -> None:
    records: list[Any] = []
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    ledger = UsagePersistence(url, spool_path=tmp_path / "spool.db")
    tel, _ = telemetry(record_completion=records.append, persistence=ledger)
    with track_workflow("before-fork"):
        build_chat_graph().invoke(Q)
    assert tel.force_flush() and ledger.flush(10)
    assert tel.monitoring.get_workflow_stats()["workflow_ops"]["finished"] == 1

    def child() -> str:  # its sink threads must be there again
        with track_workflow("in-child"):
            build_chat_graph().invoke(Q)
        flushed = tel.force_flush(5_000) and ledger.flush(10)
        ops = tel.monitoring.get_workflow_stats()["workflow_ops"]
        calls = tel.analytics.snapshot()["model"]["chatter-local-1"]["calls"]
        return (f"{flushed} {ops['finished']} {ops['active']} {len(records)} {calls} "
                f"{ledger.stats['written']}")  # fmt: skip

    # the child: flushed; 2 runs finished in monitoring (1 inherited), 4 pushed completions
    # (2 inherited), 4 calls in live analytics; its ledger wrote its run's 3 records (6 counted,
    # 3 inherited)
    assert in_forked_child(child) == "True 2 0 4 4 6"
    # the parent is unaffected by the child, and the ledger has both processes' rows
    time.sleep(0.05)
    assert tel.monitoring.get_workflow_stats()["workflow_ops"]["finished"] == 1
    assert len(records) == 2
    assert ledger.flush(10)
    engine = create_engine(f"sqlite:///{tmp_path}/app.db")
    with engine.connect() as conn:
        assert len(list(conn.execute(select(LEDGER)))) == 4
    engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_lock_held_at_the_fork_is_free_in_the_child(telemetry: Any) -> None:
    """The monitoring worker caught inside the service's lock at the instant of the fork (held
    here by a thread of the test, the service's own lock): that thread is not in the child,
    so the lock would stay held there for ever. The child gets a fresh one: its runs are
    monitored and the app can read the stats."""
    import threading

    tel, _ = telemetry()
    service = tel.monitoring
    held, release = threading.Event(), threading.Event()

    def worker_mid_update() -> None:
        with service._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=worker_mid_update)
    thread.start()
    assert held.wait(5)

    def child() -> str:
        with track_workflow("in-child"):
            build_chat_graph().invoke(Q)
        flushed = tel.force_flush(5_000)
        ops = service.get_workflow_stats()["workflow_ops"]
        return f"{flushed} {ops['finished']} {ops['active']}"

    def release_the_parent_s_lock() -> None:
        release.set()
        thread.join()

    # a child that hangs on the lock is killed after 30 s, and fails the test
    said = in_forked_child(child, after_fork=release_the_parent_s_lock, timeout_s=30)
    assert said == "True 1 0"
