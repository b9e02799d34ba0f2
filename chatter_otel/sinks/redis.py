"""One event stream across worker processes: an ``EventBus`` bridged over Redis pub/sub.

Each process runs a ``RedisEventBridge`` beside its bus: events its own processors publish go to
the Redis channel, and events other processes published come back into the local bus, so every
subscriber in every process sees one stream. Each message carries its origin, so a process never
takes its own events back. Redis being down is logged (rate-limited) and retried; the local bus
keeps working meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from typing import TYPE_CHECKING

from chatter_otel._safety import warn_once
from chatter_otel.sinks.events import EventBus, UnifiedEvent

if TYPE_CHECKING:
    from chatter_otel.sinks.events import Subscription

__all__ = ["RedisEventBridge"]

DEFAULT_CHANNEL = "chatter-otel:events"


class RedisEventBridge:
    """``await bridge.start()`` in each process (on its event loop); ``await bridge.close()``."""

    def __init__(
        self, bus: EventBus, url: str = "redis://127.0.0.1:6379/0",
        channel: str = DEFAULT_CHANNEL,
    ) -> None:  # fmt: skip
        self.bus = bus
        self.url = url
        self.channel = channel
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sent = 0
        self.received = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(self.url)
        self._sub = self.bus.subscribe()
        self._tasks = [
            asyncio.create_task(self._outbound(), name="chatter-otel-redis-out"),
            asyncio.create_task(self._inbound(), name="chatter-otel-redis-in"),
        ]
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def _outbound(self) -> None:
        assert self._sub is not None
        while True:
            event = await self._sub.get()
            if event.metadata.get("origin") not in (None, self.origin):
                continue  # came from Redis: do not send it back
            try:  # any failure skips this event only: the task must outlive it
                payload = json.dumps({"origin": self.origin, "event": event.to_dict()},
                                     default=str)  # fmt: skip
                await self._redis.publish(self.channel, payload)
                self.sent += 1
            except Exception:
                warn_once("redis:publish", "chatter-otel: cannot publish events to Redis at %s",
                          self.url, exc_info=True)  # fmt: skip

    async def _inbound(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.channel)
                self._ready.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = json.loads(message["data"])
                    if data.get("origin") == self.origin:
                        continue
                    event = UnifiedEvent.from_dict(data["event"])
                    event.metadata["origin"] = data["origin"]
                    self.received += 1
                    self.bus.publish(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                warn_once("redis:subscribe", "chatter-otel: Redis event subscription failed; "
                          "retrying", exc_info=True)  # fmt: skip
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sub is not None:
            self._sub.close()
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    def __repr__(self) -> str:
        return f"RedisEventBridge({self.url!r}, channel={self.channel!r}, origin={self.origin!r})"
