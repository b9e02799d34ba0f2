"""Lifecycle events from spans: ``UnifiedEvent``, an in-process bus, and an SSE helper.

``EventSpanProcessor`` turns the spans of a run into events as they start and end:
``workflow_started`` / ``workflow_completed`` / ``workflow_failed`` for the outermost workflow of
a run, ``node_completed``, ``llm_call_completed`` (tokens, cost, duration, time to first chunk)
and ``tool_called``; each carries the trace, span, correlation, conversation, user and workflow
ids. It publishes to an ``EventBus`` (or any object with ``publish(event)``); with no subscriber
it builds nothing. The bus keeps one bounded queue per subscriber: when a subscriber falls
behind, its oldest events are dropped and counted, and nobody else (publisher, app, other
subscribers) waits for it. Publishing is thread-safe and never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.records import (
    LLMCallRecord,
    NodeRecord,
    ToolCallRecord,
    WorkflowRecord,
)
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent
from chatter_otel.sinks.fill import app_tracking
from chatter_otel.sinks.validation import checked

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from chatter_otel.instrumentation.records import Record, WorkflowStart
    from chatter_otel.instrumentation.runs import RunIds

__all__ = [
    "EventBus",
    "EventSpanProcessor",
    "Forwarder",
    "Subscription",
]


class Subscription:
    """One subscriber's bounded queue; iterate it with ``async for``."""

    def __init__(self, bus: EventBus, maxsize: int, accept: Callable[[UnifiedEvent], bool] | None):
        self._bus = bus
        self._queue: deque[UnifiedEvent] = deque(maxlen=maxsize)
        self._accept = accept
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self.dropped = 0

    def _offer(self, event: UnifiedEvent) -> None:
        if self._accept is not None and not self._accept(event):
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
        self._queue.append(event)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the subscriber's loop is closed: it is gone
            self._bus.unsubscribe(self)

    async def get(self) -> UnifiedEvent:
        while not self._queue:
            self._ready.clear()
            if self._queue:
                break
            await self._ready.wait()
        return self._queue.popleft()

    def __aiter__(self) -> AsyncIterator[UnifiedEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[UnifiedEvent]:
        while True:
            yield await self.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    """In-process publish/subscribe with a bounded queue per subscriber (drop-oldest)."""

    def __init__(self, queue_size: int = 1_000) -> None:
        self.queue_size = queue_size
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
        self._listeners: tuple[Callable[[UnifiedEvent], Any], ...] = ()
        self.published = 0
        self.rejected = 0  # events dropped at a boundary (Redis in, SSE out, forwarding)

    def subscribe(
        self,
        *,
        conversation_id: str | None = None,
        user_id: str | None = None,
        maxsize: int | None = None,
    ) -> Subscription:
        """A new subscription (call from the subscriber's event loop), optionally filtered."""

        def accept(e: UnifiedEvent) -> bool:
            return (conversation_id is None or e.conversation_id == conversation_id) and (
                user_id is None or e.user_id == user_id
            )

        filtered = conversation_id is not None or user_id is not None
        sub = Subscription(self, maxsize or self.queue_size, accept if filtered else None)
        with self._lock:
            self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def publish(self, event: UnifiedEvent) -> None:
        """Hand the event to every subscriber; never blocks, never raises."""
        self.published += 1
        for sub in self._subs:
            sub._offer(event)
        for listener in self._listeners:
            listener(event)  # a bounded worker's submit: never blocks

    def add_listener(self, listener: Callable[[UnifiedEvent], Any]) -> None:
        """A synchronous, non-blocking listener (``AppEventForwarder``): no event loop needed."""
        self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Callable[[UnifiedEvent], Any]) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subs or self._listeners)

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self._subs)

    def forward_to(
        self,
        emit: Callable[[Any], Awaitable[Any]],
        *,
        convert: Callable[[UnifiedEvent], Any] | None = None,
        timeout_s: float = 5.0,
        maxsize: int | None = None,
    ) -> Forwarder:
        """Forward every event to the app's own async ``emit`` (call from the app's loop).

        ``convert`` turns a ``UnifiedEvent`` into the app's event class first. A call that
        raises or takes longer than ``timeout_s`` is logged and skipped; meanwhile events wait
        in this forwarder's own bounded queue, so nothing else waits for it.
        """
        return Forwarder(self.subscribe(maxsize=maxsize), emit, convert, timeout_s)


class Forwarder:
    """A running ``forward_to``; ``close()`` stops it."""

    def __init__(
        self,
        sub: Subscription,
        emit: Callable[[Any], Awaitable[Any]],
        convert: Callable[[UnifiedEvent], Any] | None,
        timeout_s: float,
    ) -> None:
        self.sub = sub
        self.forwarded = 0
        self.failed = 0
        self._emit, self._convert, self._timeout = emit, convert, timeout_s
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            event = await self.sub.get()
            if checked(self.sub._bus, "forwarding", event) is None:
                continue
            try:
                payload = self._convert(event) if self._convert is not None else event
                await asyncio.wait_for(self._emit(payload), self._timeout)
                self.forwarded += 1
            except asyncio.CancelledError:
                raise
            except Exception:  # includes the timeout
                self.failed += 1
                warn_once("events:emit", "chatter-otel: the app's emit() failed or timed out; "
                          "event skipped", exc_info=True)  # fmt: skip

    async def close(self) -> None:
        self.sub.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _NoBus:
    has_subscribers = False

    def publish(self, event: UnifiedEvent) -> None:
        pass


class EventSpanProcessor(RecordSpanProcessor):
    """Records of our spans -> lifecycle events on ``bus`` (anything with ``publish`` and,
    optionally, ``has_subscribers``)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def _listening(self) -> bool:
        return bool(getattr(self.bus, "has_subscribers", True))

    def _event(  # noqa: PLR0917 - internal, one line per event kind
        self, ids: RunIds, trace_id: str, span_id: str, workflow_id: str | None,
        span_name: str, event_type: str, **data: Any,
    ) -> None:  # fmt: skip
        self.bus.publish(
            UnifiedEvent(
                category=EventCategory.WORKFLOW,
                event_type=event_type,
                correlation_id=ids.correlation_id,
                trace_id=trace_id,
                span_id=span_id,
                conversation_id=ids.conversation_id,
                user_id=ids.user_id,
                workflow_id=workflow_id,
                priority="high" if event_type == "workflow_failed" else "normal",
                data={k: v for k, v in data.items() if v is not None},
                metadata={
                    "message_id": ids.message_id,
                    "span_name": span_name,
                    **({"app_tracked": True} if app_tracking.get() is not None else {}),
                },
            )
        )

    def workflow_started(self, start: WorkflowStart, span_id: str, trace_id: str) -> None:
        if start.outermost and self._listening():
            self._event(start.ids, trace_id, span_id, span_id, start.span_name,
                        "workflow_started", workflow_name=start.name)  # fmt: skip

    def ended(self, rec: Record) -> None:
        if not self._listening():
            return
        error: dict[str, Any] = (
            {"error_type": rec.error_type, "error": rec.error_message} if rec.failed else {}
        )
        duration_ms = (rec.end_ns - rec.start_ns) / 1e6
        common = (rec.ids, rec.trace_id, rec.span_id, rec.workflow_id)
        if isinstance(rec, WorkflowRecord):
            if not rec.outermost:
                return
            self._event(
                *common, rec.span_name,
                event_type="workflow_failed" if rec.failed else "workflow_completed",
                workflow_name=rec.name, duration_ms=duration_ms, input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens, total_tokens=rec.total_tokens,
                cost=float(rec.cost) if rec.cost is not None else None,
                llm_calls=rec.llm_calls, tool_calls=rec.tool_calls, **error,
            )  # fmt: skip
        elif isinstance(rec, LLMCallRecord):
            name = f"{rec.operation} {rec.request_model}" if rec.request_model else rec.operation
            self._event(
                *common, name, event_type="llm_call_completed", duration_ms=duration_ms,
                provider=rec.provider, model=rec.model, input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens, total_tokens=rec.total_tokens,
                cost=float(rec.cost) if rec.cost is not None else None,
                time_to_first_chunk=rec.time_to_first_chunk_s, **error,
            )  # fmt: skip
        elif isinstance(rec, ToolCallRecord):
            self._event(
                *common, f"execute_tool {rec.name}", event_type="tool_called",
                tool_name=rec.name, tool_call_id=rec.call_id, duration_ms=duration_ms, **error,
            )  # fmt: skip
        elif isinstance(rec, NodeRecord):
            self._event(
                *common, f"invoke_node {rec.name}", event_type="node_completed", node=rec.name,
                duration_ms=duration_ms, **error,
            )  # fmt: skip

    def repoint(self, bus: Any = None, **_: Any) -> None:
        self.bus = bus

    def detach(self) -> None:
        """Stop publishing (processors cannot be removed from a provider)."""
        self.bus = _NoBus()

    def shutdown(self) -> None:
        self.detach()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
