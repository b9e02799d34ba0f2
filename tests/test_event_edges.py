"""Events are validated wherever they cross a boundary: Redis in, SSE out, forwarding."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent
from chatter_otel.sinks.events import EventBus
from chatter_otel.sinks.redis import RedisEventBridge
from chatter_otel.sinks.sse import sse_response
from chatter_otel.sinks.validation import InvalidEvent, validate_event
from tests.conftest import REDIS_PORT, REDIS_URL
from tests.test_persistence import _Proxy

INJECTION = 'x\nevent: injected\ndata: {"pwned":true}\n\n'


def _good(**kw: Any) -> UnifiedEvent:
    fields: dict[str, Any] = {"category": EventCategory.WORKFLOW,
                              "event_type": "workflow_started", "trace_id": "ab" * 16,
                              "span_id": "cd" * 8, "correlation_id": "req-1"}  # fmt: skip
    return UnifiedEvent(**{**fields, **kw})


def _envelope(event: dict[str, Any], origin: str = "elsewhere") -> str:
    return json.dumps({"origin": origin, "event": event})


@pytest.mark.parametrize(
    "bad",
    [
        {"event_type": INJECTION},
        {"id": "1\r\nid: 2"},
        {"trace_id": "not hex"},
        {"correlation_id": "a\r\nb"},
        {"conversation_id": "<script>alert(1)</script>"},
        {"user_id": "x" * 257},
        {"priority": "urgent\n"},
        {"data": {"n": float("nan")}},
        {"data": {"big": "x" * 70_000}},
        {"metadata": {1: "non-string key"}},
    ],
)
def test_validation_refuses_each_hostile_field(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent) as caught:
        validate_event(_good(**bad))
    for value in bad.values():  # the error names the field, never the value
        assert str(value)[:20] not in str(caught.value) or str(value) == ""


async def test_sse_never_writes_an_unchecked_field() -> None:
    bus = EventBus()
    response = sse_response(bus, heartbeat_s=60)
    frames = response.body_iterator
    assert (await anext(frames)).startswith(": connected")
    bus.publish(UnifiedEvent(category=EventCategory.WORKFLOW, event_type=INJECTION))
    bus.publish(_good(id="ok-1"))
    frame = await asyncio.wait_for(anext(frames), 5)
    assert frame.startswith("id: ok-1\nevent: workflow_started\ndata: {")
    assert "injected" not in frame and "pwned" not in frame
    assert bus.rejected == 1
    await frames.aclose()


async def test_forwarding_drops_what_fails_validation() -> None:
    bus = EventBus()
    got: list[Any] = []

    async def emit(event: Any) -> None:
        got.append(event)

    fwd = bus.forward_to(emit)
    bus.publish(UnifiedEvent(category=EventCategory.WORKFLOW, event_type=INJECTION))
    bus.publish(_good(id="ok-2"))
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    await fwd.close()
    assert [e.id for e in got] == ["ok-2"] and bus.rejected == 1


async def _numsub(client: Any, channel: str) -> int:
    return int(dict(await client.pubsub_numsub(channel))[channel.encode()])


async def test_malformed_redis_messages_are_dropped_and_the_subscription_kept() -> None:
    channel = f"chatter-otel-test-{uuid.uuid4().hex}"
    bus = EventBus()
    sub = bus.subscribe()
    bridge = RedisEventBridge(bus, url=REDIS_URL, channel=channel)
    await bridge.start()
    client = redis.from_url(REDIS_URL)
    try:
        bad = [
            "not json", "[]", json.dumps({"event": {}}), _envelope({"category": "workflow"}),
            _envelope({**_good().to_dict(), "event_type": INJECTION}),
            _envelope({**_good().to_dict(), "id": "a\nb"}), "{" * 100_000 + "}" * 100_000,
        ] * 3  # fmt: skip
        for message in bad:
            await client.publish(channel, message)
        await client.publish(channel, _envelope(_good(id="after").to_dict()))
        event = await asyncio.wait_for(sub.get(), 5)  # no gap: the next valid one arrives
        assert event.id == "after" and event.event_type == "workflow_started"
        assert bus.rejected == len(bad) == 21
        assert bridge.reconnects == 0
        assert await _numsub(client, channel) == 1  # one subscription, not one per bad message
    finally:
        await bridge.close()
        await client.aclose()


async def test_redis_outages_are_counted_and_survived() -> None:
    channel = f"chatter-otel-test-{uuid.uuid4().hex}"
    proxy = _Proxy(REDIS_PORT)
    bus = EventBus()
    reader = InMemoryMetricReader()
    bridge = RedisEventBridge(bus, url=f"redis://127.0.0.1:{proxy.port}/0", channel=channel,
                              meter_provider=MeterProvider(metric_readers=[reader]))  # fmt: skip
    await bridge.start()
    client = redis.from_url(REDIS_URL)
    listener = client.pubsub()
    await listener.subscribe(channel)
    try:
        bus.publish(_good(id="before"))
        for _ in range(200):
            if bridge.sent:
                break
            await asyncio.sleep(0.01)
        proxy.cut()
        for i in range(5):
            bus.publish(_good(id=f"during-{i}"))
        for _ in range(300):
            if bridge.lost == 5 and bridge.reconnects:
                break
            await asyncio.sleep(0.02)
        assert (bridge.sent, bridge.lost) == (1, 5)
        assert bridge.reconnects >= 1
        proxy.restore()
        for _ in range(300):  # it subscribes again by itself, and publishes again
            bus.publish(_good(id="after"))
            await asyncio.sleep(0.05)
            if bridge.sent > 1:
                break
        assert bridge.sent > 1
        metrics = {
            m.name: sum(p.value for p in m.data.data_points)
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics
        }  # fmt: skip
        assert metrics["chatter.events.redis.lost"] == 5
        assert metrics["chatter.events.redis.reconnects"] == bridge.reconnects
    finally:
        await bridge.close()
        await listener.aclose()
        await client.aclose()
        proxy.close()


async def test_with_a_secret_only_signed_events_cross_redis(monkeypatch: Any) -> None:
    """Anyone who can publish on the channel could otherwise deliver a well-formed
    ``workflow_completed`` with 999999 tokens to every SSE client: with a shared secret,
    unsigned and badly signed messages are dropped and counted; signed ones pass."""
    monkeypatch.setenv("CHATTER_OTEL_EVENTS_SECRET", "shared-by-the-app's-workers")
    channel = f"chatter-otel-test-{uuid.uuid4().hex}"
    sender_bus, receiver_bus = EventBus(), EventBus()
    sender = RedisEventBridge(sender_bus, url=REDIS_URL, channel=channel)
    receiver = RedisEventBridge(receiver_bus, url=REDIS_URL, channel=channel)
    await sender.start()
    await receiver.start()
    sub = receiver_bus.subscribe()
    client = redis.from_url(REDIS_URL)
    forged = _good(id="forged", event_type="workflow_completed",
                   data={"total_tokens": 999999}).to_dict()  # fmt: skip
    body = json.dumps(forged)
    try:
        await client.publish(channel, _envelope(forged))  # unsigned
        await client.publish(channel, json.dumps({"origin": "x", "body": body, "sig": "00" * 32}))
        wrong = RedisEventBridge(EventBus(), url=REDIS_URL, channel=channel, secret="guess")
        await client.publish(channel, wrong._envelope(forged))  # signed with another secret
        sender_bus.publish(_good(id="genuine"))
        event = await asyncio.wait_for(sub.get(), 5)
        assert event.id == "genuine"
        assert receiver.unsigned == 3 and receiver.received == 1
        assert receiver_bus.rejected == 0
    finally:
        await sender.close()
        await receiver.close()
        await client.aclose()
