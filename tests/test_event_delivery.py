"""Event delivery beyond one process: the app's own emit(), and Redis pub/sub across processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage

from chatter_otel import track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.sinks.events import EventBus, EventSpanProcessor

if TYPE_CHECKING:
    from chatter_otel.sinks.event_types import UnifiedEvent

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}


@pytest.fixture
def bus(spans: Any) -> EventBus:
    bus = EventBus()
    spans.provider.add_span_processor(EventSpanProcessor(bus))
    return bus


class AppEvent:
    """The app's own event class."""

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind = kind
        self.payload = payload


async def test_forward_to_the_apps_emit_with_conversion(bus: EventBus) -> None:
    emitted: list[AppEvent] = []

    async def emit(event: AppEvent) -> None:
        emitted.append(event)

    fwd = bus.forward_to(emit, convert=lambda e: AppEvent(e.event_type, e.to_dict()))
    async with track_workflow("turn", correlation_id="fw-1") as run:
        await build_chat_graph().ainvoke(Q)
    for _ in range(200):
        if emitted and emitted[-1].kind == "workflow_completed":
            break
        await asyncio.sleep(0.01)
    await fwd.close()
    assert emitted[0].kind == "workflow_started"
    assert emitted[-1].kind == "workflow_completed" and len(emitted) == 8
    assert {e.payload["trace_id"] for e in emitted} == {run.trace_id}
    assert fwd.forwarded == 8 and fwd.failed == 0


@pytest.mark.parametrize("mode", ["raise", "slow"])
async def test_a_bad_emit_is_skipped(bus: EventBus, mode: str, caplog: Any) -> None:
    calls: list[str] = []

    async def emit(event: UnifiedEvent) -> None:
        calls.append(event.event_type)
        if mode == "raise":
            raise ConnectionError("event service down")
        await asyncio.sleep(3600)  # never answers: the timeout skips it

    fwd = bus.forward_to(emit, timeout_s=0.05)
    out = await build_chat_graph().ainvoke(Q)  # the run is not held up by emit
    assert out["messages"][-1].content.startswith("Here is what I found")
    for _ in range(200):
        if fwd.failed == 8:
            break
        await asyncio.sleep(0.01)
    await fwd.close()
    assert fwd.failed == 8 and fwd.forwarded == 0 and len(calls) == 8
    if mode == "raise":  # the line is rate-limited per kind: once a minute, not per event
        assert "emit() failed or timed out" in caplog.text


SUBSCRIBER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    REDIS_URL = f"redis://127.0.0.1:{os.environ.get('CHATTER_OTEL_REDIS_PORT', '56379')}/0"
    from chatter_otel.sinks.events import EventBus
    from chatter_otel.sinks.redis import RedisEventBridge

    async def main(channel, expected):
        bus = EventBus()
        bridge = RedisEventBridge(bus, url=REDIS_URL, channel=channel)
        sub = bus.subscribe()
        await bridge.start()
        print("READY", flush=True)
        got = []
        while len(got) < expected:
            e = await asyncio.wait_for(sub.get(), timeout=30)
            got.append([e.event_type, e.trace_id, e.correlation_id])
        await bridge.close()
        print(json.dumps(got), flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)

PUBLISHER = textwrap.dedent(
    """
    import asyncio, json, os, sys
    REDIS_URL = f"redis://127.0.0.1:{os.environ.get('CHATTER_OTEL_REDIS_PORT', '56379')}/0"
    from langchain_core.messages import HumanMessage
    from opentelemetry.sdk.trace import TracerProvider
    from chatter_otel import configure, track_workflow
    from chatter_otel.reference.demo import build_chat_graph
    from chatter_otel.sinks.events import EventBus
    from chatter_otel.sinks.redis import RedisEventBridge

    async def main(channel):
        bus = EventBus()
        bridge = RedisEventBridge(bus, url=REDIS_URL, channel=channel)
        await bridge.start()
        tel = configure(tracer_provider=TracerProvider(), events=bus)
        async with track_workflow("turn", correlation_id="via-redis") as run:
            await build_chat_graph().ainvoke({"messages": [HumanMessage("weather in Oslo")]})
        for _ in range(500):
            if bridge.sent >= 8:
                break
            await asyncio.sleep(0.01)
        await bridge.close()
        tel.shutdown()
        print(json.dumps({"trace_id": run.trace_id, "sent": bridge.sent}), flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


def test_two_processes_see_the_events_a_third_publishes() -> None:
    channel = f"chatter-otel-test-{uuid.uuid4().hex}"
    subs = [
        subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, channel, "8"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in subs:  # both are subscribed before anything is published
            line = p.stdout.readline()
            assert line.strip() == "READY", p.stderr.read()
        pub = subprocess.run([sys.executable, "-c", PUBLISHER, channel], capture_output=True,
                             text=True, timeout=120, check=False)  # fmt: skip
        assert pub.returncode == 0, pub.stderr
        published = json.loads(pub.stdout.strip().splitlines()[-1])
        assert published["sent"] == 8
        results = []
        for p in subs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in subs:
            p.kill()
    for got in results:
        assert [t for t, _, _ in got] == [
            "workflow_started", "llm_call_completed", "node_completed", "tool_called",
            "node_completed", "llm_call_completed", "node_completed", "workflow_completed",
        ]  # fmt: skip
        assert {tid for _, tid, _ in got} == {published["trace_id"]}
        assert {cid for _, _, cid in got} == {"via-redis"}
    assert results[0] == results[1]
