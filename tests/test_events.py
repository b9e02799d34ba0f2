"""Lifecycle events from real runs: order, ids, failures, slow subscribers, and SSE over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry import trace

from chatter_otel import track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent
from chatter_otel.sinks.events import EventBus, EventSpanProcessor

if TYPE_CHECKING:
    from chatter_otel.sinks.events import Subscription

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
SEQUENCE = [
    "workflow_started",
    "llm_call_completed",
    "node_completed",
    "tool_called",
    "node_completed",
    "llm_call_completed",
    "node_completed",
    "workflow_completed",
]


@pytest.fixture
def bus(spans: Any) -> EventBus:
    bus = EventBus()
    spans.provider.add_span_processor(EventSpanProcessor(bus))
    return bus


async def _drain(sub: Subscription, until: str = "workflow_completed", n: int = 1) -> list[Any]:
    got: list[UnifiedEvent] = []
    while sum(e.event_type in (until, "workflow_failed") for e in got) < n:
        got.append(await asyncio.wait_for(sub.get(), timeout=10))
    return got


def _check_run(events: list[UnifiedEvent], run: Any, correlation_id: str) -> None:
    assert [e.event_type for e in events] == SEQUENCE
    assert {e.trace_id for e in events} == {run.trace_id}
    assert {e.workflow_id for e in events} == {run.workflow_id}
    assert {e.correlation_id for e in events} == {correlation_id}
    assert {e.conversation_id for e in events} == {"conv-ev"}
    assert all(e.category is EventCategory.WORKFLOW for e in events)
    started, done = events[0], events[-1]
    assert started.data == {"workflow_name": "turn"}
    assert done.data["input_tokens"] == run.usage.prompt_tokens
    assert done.data["output_tokens"] == run.usage.completion_tokens
    assert done.data["cost"] == pytest.approx(float(run.usage.cost))
    assert done.data["llm_calls"] == 2 and done.data["tool_calls"] == 1
    llm = [e for e in events if e.event_type == "llm_call_completed"]
    assert sum(e.data["input_tokens"] for e in llm) == run.usage.prompt_tokens
    assert {e.data["model"] for e in llm} == {"chatter-local-1"}
    (tool,) = [e for e in events if e.event_type == "tool_called"]
    assert tool.data["tool_name"] == "get_weather" and tool.data["tool_call_id"].startswith("call_")
    assert [e.data["node"] for e in events if e.event_type == "node_completed"] == [
        "agent", "tools", "agent",
    ]  # fmt: skip
    json.dumps([e.to_dict() for e in events])  # JSON-ready


async def test_async_run_events_in_order(bus: EventBus) -> None:
    sub = bus.subscribe()
    async with track_workflow("turn", conversation_id="conv-ev", correlation_id="c-1") as run:
        await build_chat_graph().ainvoke(Q)
    _check_run(await _drain(sub), run, "c-1")


async def test_sync_run_in_a_worker_thread(bus: EventBus) -> None:
    sub = bus.subscribe()

    def turn() -> Any:
        with track_workflow("turn", conversation_id="conv-ev", correlation_id="c-2") as run:
            build_chat_graph().invoke(Q)
        return run

    run = await asyncio.to_thread(turn)
    _check_run(await _drain(sub), run, "c-2")


async def test_streamed_run(bus: EventBus) -> None:
    sub = bus.subscribe()
    async with track_workflow("turn", conversation_id="conv-ev", correlation_id="c-3") as run:
        async for _ in build_chat_graph().astream(Q, stream_mode="messages"):
            pass
    events = await _drain(sub)
    _check_run(events, run, "c-3")
    assert all(e.data["time_to_first_chunk"] > 0 for e in events if "llm_call" in e.event_type)


async def test_failed_run(bus: EventBus) -> None:
    sub = bus.subscribe()
    with pytest.raises(ZeroDivisionError):
        async with track_workflow("turn", conversation_id="conv-ev", correlation_id="c-4"):
            await build_chat_graph().ainvoke(Q)
            _ = 1 / 0
    events = await _drain(sub)
    assert events[-1].event_type == "workflow_failed"
    assert events[-1].priority == "high"
    assert events[-1].data["error_type"] == "ZeroDivisionError"


async def test_slow_subscriber_drops_oldest_and_blocks_nobody(bus: EventBus) -> None:
    slow = bus.subscribe(maxsize=3)
    fast = bus.subscribe()
    graph = build_chat_graph()
    for i in range(3):
        async with track_workflow("turn", conversation_id="conv-ev", correlation_id=f"s-{i}"):
            await graph.ainvoke(Q)
    events = await _drain(fast, n=3)
    assert len(events) == 3 * len(SEQUENCE)
    assert slow.dropped == 3 * len(SEQUENCE) - 3
    kept = [await slow.get() for _ in range(3)]
    assert [e.event_type for e in kept] == SEQUENCE[-3:]  # the newest survive
    assert bus.dropped == slow.dropped


async def test_filters_and_sibling_workflows_in_one_trace(bus: EventBus, spans: Any) -> None:
    mine = bus.subscribe(conversation_id="conv-a")
    everything = bus.subscribe()
    graph = build_chat_graph()
    tracer = trace.get_tracer("app", tracer_provider=spans.provider)

    async def turn(conv: str) -> Any:
        async with track_workflow("turn", conversation_id=conv, correlation_id=conv) as run:
            await graph.ainvoke(Q)
        return run

    with tracer.start_as_current_span("POST /chat"):  # one request trace, two concurrent runs
        runs = await asyncio.gather(turn("conv-a"), turn("conv-b"))
    events = await _drain(everything, n=2)
    starts = [e for e in events if e.event_type == "workflow_started"]
    assert sorted(e.workflow_id for e in starts) == sorted(r.workflow_id for r in runs)
    assert len({e.trace_id for e in events}) == 1
    only_a = await _drain(mine)
    assert {e.conversation_id for e in only_a} == {"conv-a"}


def test_no_subscriber_builds_nothing(bus: EventBus) -> None:
    build_chat_graph().invoke(Q)
    assert bus.published == 0


def test_sse_endpoint_of_the_reference_app(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatter_otel.reference.app import create_app, create_tables
    from tests.test_reference_app import Served

    monkeypatch.setenv("CHATTER_OTEL_TRACE_STORE", str(tmp_path / "t.db"))
    app = create_app(database_url=f"sqlite+aiosqlite:///{tmp_path}/app.db", set_global=False)
    asyncio.run(create_tables(app))
    served = Served(app)
    received: list[tuple[str, dict[str, Any]]] = []
    connected = threading.Event()

    def listen() -> None:
        req = urllib.request.Request(served.base + "/events?user_id=u-sse")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            event = None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith(": connected"):
                    connected.set()
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    received.append((event, json.loads(line[6:])))
                    if event == "workflow_completed":
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        assert connected.wait(10)
        served.request("POST", "/chat", {"message": "weather in Lima", "user_id": "someone-else"})
        status, _, body = served.request(
            "POST", "/chat", {"message": "weather in Oslo", "user_id": "u-sse"},
            {"X-Correlation-ID": "sse-1"},
        )  # fmt: skip
        assert status == 200
        thread.join(15)
        assert [e for e, _ in received] == SEQUENCE
        assert {d["correlation_id"] for _, d in received} == {"sse-1"}
        assert {d["user_id"] for _, d in received} == {"u-sse"}
        assert {d["trace_id"] for _, d in received} == {json.loads(body)["trace_id"]}
    finally:
        served.close()
        time.sleep(0)
