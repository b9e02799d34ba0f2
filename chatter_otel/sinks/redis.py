"""One event stream across worker processes: an ``EventBus`` bridged over Redis pub/sub.

Each process runs a ``RedisEventBridge`` beside its bus: events its own processors publish go to
the Redis channel, and events other processes published come back into the local bus, so every
subscriber in every process sees one stream. Each message carries its origin, so a process never
takes its own events back. Redis being down is logged (rate-limited) and retried; the local bus
keeps working meanwhile.

Anyone who can publish on the channel can otherwise deliver well-formed events to every
subscriber (and so to every SSE client). With a shared secret (``secret=``, else
``CHATTER_OTEL_EVENTS_SECRET``) every message is signed (HMAC-SHA256 over its origin and its
event, in the envelope's ``sig``), and a message without a valid signature is dropped, counted
(``unsigned``, ``chatter.events.unsigned``) and said once a minute. Every process of the app
needs the same secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import uuid
from typing import TYPE_CHECKING, Any

from chatter_otel._safety import warn_once
from chatter_otel.attributes import (
    EVENTS_REDIS_LOST_METRIC,
    EVENTS_REDIS_RECONNECTS_METRIC,
    EVENTS_REJECTED_METRIC,
    EVENTS_UNSIGNED_METRIC,
)
from chatter_otel.sinks.validation import InvalidEvent, event_from_dict, reject
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.sinks.events import EventBus, Subscription

__all__ = ["RedisEventBridge"]

_log = logging.getLogger("chatter_otel")
DEFAULT_CHANNEL = "chatter-otel:events"
_MAX_MESSAGE_BYTES = 256 * 1024
ENV_EVENTS_SECRET = "CHATTER_OTEL_EVENTS_SECRET"


def _signature(secret: bytes, origin: str, body: str) -> str:
    return hmac.new(secret, f"{origin}\n{body}".encode(), hashlib.sha256).hexdigest()


class RedisEventBridge:
    """``await bridge.start()`` in each process (on its event loop); ``await bridge.close()``.

    Counted, and on ``meter_provider`` as metrics: ``sent``, ``received``, ``lost`` (events this
    process could not publish while Redis was unreachable: ``chatter.events.redis.lost``),
    ``reconnects`` (``chatter.events.redis.reconnects``) and, on the bus, ``rejected``
    (malformed messages dropped: ``chatter.events.rejected``). A malformed message never costs
    the subscription.
    """

    def __init__(
        self, bus: EventBus, url: str = "redis://127.0.0.1:6379/0",
        channel: str = DEFAULT_CHANNEL, meter_provider: MeterProvider | None = None,
        secret: str | bytes | None = None,
    ) -> None:  # fmt: skip
        self.bus = bus
        raw = secret if secret is not None else os.environ.get(ENV_EVENTS_SECRET) or None
        self._secret = raw.encode() if isinstance(raw, str) else raw
        self.unsigned = 0
        self.url = url
        self.channel = channel
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sent = 0
        self.received = 0
        self.lost = 0
        self.reconnects = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        self._ready = asyncio.Event()
        self.connect_wait_s = 2.0
        self._down_since_boot = False
        self._metrics(meter_provider)

    def _metrics(self, meter_provider: MeterProvider | None) -> None:
        from opentelemetry.metrics import Observation

        meter = our_meter(meter_provider)

        def observe(read: Callable[[], int]) -> Callable[[Any], list[Observation]]:
            return lambda _options: [Observation(read())]

        meter.create_observable_counter(
            EVENTS_REDIS_LOST_METRIC, [observe(lambda: self.lost)], unit="{event}"
        )
        meter.create_observable_counter(
            EVENTS_REDIS_RECONNECTS_METRIC, [observe(lambda: self.reconnects)], unit="{event}"
        )
        meter.create_observable_counter(
            EVENTS_UNSIGNED_METRIC, [observe(lambda: self.unsigned)], unit="{event}"
        )
        meter.create_observable_counter(
            EVENTS_REJECTED_METRIC,
            [observe(lambda: int(getattr(self.bus, "rejected", 0)))],
            unit="{event}",
        )

    async def start(self) -> None:
        try:
            import redis.asyncio as redis
        except ImportError as exc:
            raise ImportError(
                "RedisEventBridge needs the 'redis' extra: pip install 'chatter-otel[redis]'"
            ) from exc

        self._redis = redis.from_url(self.url)
        self._sub = self.bus.subscribe()
        self._tasks = [
            asyncio.create_task(self._outbound(), name="chatter-otel-redis-out"),
            asyncio.create_task(self._inbound(), name="chatter-otel-redis-in"),
        ]
        # Never raises: with Redis down at boot the app starts all the same; events stay
        # in-process meanwhile (one log line) and the bridge subscribes when Redis is back.
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=self.connect_wait_s)
        except TimeoutError:
            _log.warning("chatter-otel: Redis at %s is not reachable; events stay in this "
                         "process until it is (reconnecting in the background)",
                         self._safe_url())  # fmt: skip

    async def _outbound(self) -> None:
        assert self._sub is not None
        while True:
            event = await self._sub.get()
            if event.metadata.get("origin") not in (None, self.origin):
                continue  # came from Redis: do not send it back
            try:  # any failure skips this event only: the task must outlive it
                payload = self._envelope(event.to_dict())
                await self._redis.publish(self.channel, payload)
                self.sent += 1
            except Exception:
                self.lost += 1
                warn_once("redis:publish", "chatter-otel: cannot publish events to Redis at %s; "
                          "%d event(s) lost to other processes so far", self._safe_url(),
                          self.lost, exc_info=True)  # fmt: skip

    def _envelope(self, event: dict[str, Any]) -> str:
        body = json.dumps(event, default=str)
        envelope = {"origin": self.origin, "body": body}
        if self._secret is not None:
            envelope["sig"] = _signature(self._secret, self.origin, body)
        return json.dumps(envelope)

    def _signed(self, data: dict[str, Any]) -> bool:
        sig, body = data.get("sig"), data.get("body")
        if self._secret is None:
            return True
        ok = isinstance(sig, str) and isinstance(body, str) and hmac.compare_digest(
            sig, _signature(self._secret, data["origin"], body)
        )  # fmt: skip
        if not ok:
            self.unsigned += 1
            warn_once("redis:unsigned", "chatter-otel: dropped an event from Redis without a "
                      "valid signature (%d so far); is %s the same in every process?",
                      self.unsigned, ENV_EVENTS_SECRET)  # fmt: skip
        return ok

    def _take(self, message: Any) -> None:
        """One channel message into the local bus, if it is a valid (and, with a secret,
        validly signed) event from elsewhere."""
        try:
            raw = message.get("data")
            if isinstance(raw, bytes | bytearray) and len(raw) > _MAX_MESSAGE_BYTES:
                raise InvalidEvent(f"message over {_MAX_MESSAGE_BYTES} bytes")
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("origin"), str):
                raise InvalidEvent("not an event envelope")
            if data["origin"] == self.origin or not self._signed(data):
                return
            body = data.get("body")
            # "body": the event as signed text; "event": an object (unsigned senders)
            event = event_from_dict(
                json.loads(body) if isinstance(body, str) else data.get("event")
            )
        except (InvalidEvent, ValueError, TypeError, RecursionError) as exc:
            reject(self.bus, "Redis in", InvalidEvent(type(exc).__name__))
            return
        event.metadata["origin"] = data["origin"][:64]
        self.received += 1
        self.bus.publish(event)

    async def _inbound(self) -> None:
        backoff = 0.5
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                if self._down_since_boot:
                    _log.info("chatter-otel: reached Redis at %s; events are shared between "
                              "processes again", self._safe_url())  # fmt: skip
                    self._down_since_boot = False
                self._ready.set()
                backoff = 0.5
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._take(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self._ready.is_set():  # down at boot: start() said so, once
                    self._down_since_boot = True
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                self.reconnects += 1
                warn_once("redis:subscribe", "chatter-otel: Redis event subscription at %s lost;"
                          " reconnecting (%d so far)", self._safe_url(), self.reconnects,
                          exc_info=True)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # never two live

    def _safe_url(self) -> str:
        """The URL without its password, for log lines."""
        return re.sub(r"//[^@/]*@", "//***@", self.url)

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
        return f"RedisEventBridge({self._safe_url()!r}, channel={self.channel!r})"
