"""Events to the app's own event system, set up from the synchronous ``configure()`` call.

``configure(events=EventOptions(forward_to=emit, converter=convert))``: every lifecycle event goes,
checked at the boundary, converted to the app's class, to the app's ``emit`` (sync or async), on the
one bounded worker design (off the app's thread; a slow or failing ``emit`` costs only its own
queue, counted). An async ``emit`` runs on the app's event loop once one is known (the correlation
middleware sees it with the first request), else on the worker's own loop.
``app_event_converter(AppEvent, ...)`` builds such a converter for an app event class.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
from typing import TYPE_CHECKING, Any

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel._safety import warn_once
from chatter_otel.app_loop import app_loop
from chatter_otel.sinks.validation import checked
from chatter_otel.sinks.worker import BoundedWorker

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from enum import Enum

    from chatter_otel.sinks.event_types import UnifiedEvent
    from chatter_otel.sinks.events import EventBus

__all__ = ["AppEventForwarder", "app_event_converter"]


class AppEventForwarder:
    def __init__(
        self, bus: EventBus, emit: Callable[[Any], Any],
        convert: Callable[[UnifiedEvent], Any] | None = None, *,
        skip: Callable[[UnifiedEvent], bool] | None = None, timeout_s: float = 5.0,
        max_queue: int = 10_000,
    ) -> None:  # fmt: skip
        self.bus, self.emit, self.convert, self.skip = bus, emit, convert, skip
        self.timeout_s = timeout_s
        self.forwarded = self.failed = 0
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
        self.worker: BoundedWorker[UnifiedEvent] = BoundedWorker(
            "events-forward", self._handle, max_queue=max_queue
        )
        bus.add_listener(self._offer)

    def _offer(self, event: UnifiedEvent) -> None:
        if self.skip is None or not self.skip(event):
            self.worker.submit(event)

    def _handle(self, batch: list[UnifiedEvent]) -> None:
        for event in batch:
            if checked(self.bus, "forwarding", event) is None:
                continue
            try:
                payload = self.convert(event) if self.convert is not None else event
                result = self.emit(payload)
                if inspect.isawaitable(result):
                    self._wait(result)
                self.forwarded += 1
            except Exception:
                self.failed += 1
                warn_once("events:emit", "chatter-otel: the app's emit() failed or timed out; "
                          "event skipped", exc_info=True)  # fmt: skip

    def _wait(self, awaitable: Any) -> None:
        loop = app_loop()
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop).result(self.timeout_s)
            return
        if self._own_loop is None:
            self._own_loop = asyncio.new_event_loop()
        self._own_loop.run_until_complete(
            asyncio.wait_for(_as_coroutine(awaitable), self.timeout_s)
        )

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.worker.flush(timeout_s)

    def close(self) -> None:
        self.bus.remove_listener(self._offer)
        self.worker.stop(2.0)


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _fields(cls: Any) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    model_fields = getattr(cls, "model_fields", None)  # pydantic v2
    if isinstance(model_fields, dict):
        return list(model_fields)
    return [p for p in inspect.signature(cls).parameters if p != "self"]


def app_event_converter(
    cls: Any, *, field_map: Mapping[str, str] | None = None,
    enums: Mapping[str, type[Enum]] | None = None, constants: Mapping[str, Any] | None = None,
) -> Callable[[UnifiedEvent], Any]:  # fmt: skip
    """A converter from ``UnifiedEvent`` to the app's event class ``cls`` (a dataclass, a
    pydantic model or any class taking keyword arguments): each of the app's fields takes our
    field of the same name, or the one ``field_map`` names for it (``{"session_id":
    "conversation_id"}``); ``enums`` turns a value into the app's enum (by member name, then by
    value: ``{"priority": EventPriority}``); ``constants`` fills the rest
    (``{"source_system": "chatter-otel"}``). Fields the app does not have (trace and span ids,
    for one) are left out; ``timestamp`` stays a ``datetime``."""
    names, mapping = _fields(cls), dict(field_map or {})
    enums, constants = dict(enums or {}), dict(constants or {})

    def convert(event: UnifiedEvent) -> Any:
        ours = dataclasses.asdict(event)
        values: dict[str, Any] = {}
        for name in names:
            if name in constants:
                values[name] = constants[name]
                continue
            source = mapping.get(name, name)
            if source not in ours:
                continue
            value = ours[source]
            if name in enums and value is not None:
                enum = enums[name]
                raw = getattr(value, "value", value)
                key = str(raw).upper()
                value = enum[key] if key in enum.__members__ else enum(raw)
            values[name] = value
        return cls(**values)

    return convert
