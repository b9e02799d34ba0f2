"""Events are checked wherever they cross a boundary: in from Redis, out to SSE clients, out to
the app's own ``emit``. A message that fails is dropped, counted on the bus (``rejected``) and
logged once a minute per boundary, without its content; the stream it came in on is kept.

What passes: ``event_type`` 1-64 of ``[a-z0-9_.]`` starting with a letter; ``id`` 1-128 of
``[A-Za-z0-9._:-]``; a known ``category`` and ``priority``; trace and span ids as lowercase hex
of their length; a valid correlation id; conversation and user ids as ``is_valid_app_id`` says
(1-256 printable characters, no control or bidi characters, white space, quotes, backslashes
or ``<>``); ``data`` and ``metadata`` JSON objects with string keys (no NaN or infinity), at
most 64 KiB serialized. Nothing that could
end an SSE line, a header or an HTML attribute gets through.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from chatter_otel._safety import warn_once
from chatter_otel.correlation import (
    CORRELATION_ID_PATTERN,
    is_valid_app_id,
    is_valid_correlation_id,
)
from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent

__all__ = ["InvalidEvent", "event_from_dict", "validate_event"]

_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_ID = re.compile(CORRELATION_ID_PATTERN, re.ASCII)  # event ids: the correlation id's set
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_PRIORITIES = frozenset({"low", "normal", "high", "critical"})
_CATEGORIES = frozenset(c.value for c in EventCategory)
MAX_JSON_BYTES = 64 * 1024


class InvalidEvent(ValueError):
    """An event that must not cross a boundary; the message names the field, never its value."""


def _check(ok: bool, field: str) -> None:
    if not ok:
        raise InvalidEvent(f"invalid {field}")


def _optional(value: Any, pattern: re.Pattern[str], field: str) -> None:
    _check(value is None or (isinstance(value, str) and pattern.fullmatch(value) is not None),
           field)  # fmt: skip


def _json_object(value: Any, field: str) -> None:
    _check(isinstance(value, dict) and all(isinstance(k, str) for k in value), field)
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(f"invalid {field}: not JSON") from exc
    _check(len(encoded) <= MAX_JSON_BYTES, f"{field} (over {MAX_JSON_BYTES} bytes)")


def validate_event(event: UnifiedEvent) -> UnifiedEvent:
    """``event`` itself if every field is fit to cross a boundary; raises ``InvalidEvent``."""
    _check(isinstance(event.event_type, str) and _TYPE.fullmatch(event.event_type) is not None,
           "event_type")  # fmt: skip
    _check(isinstance(event.id, str) and _ID.fullmatch(event.id) is not None, "id")
    _check(getattr(event.category, "value", event.category) in _CATEGORIES, "category")
    _check(event.priority in _PRIORITIES, "priority")
    _check(isinstance(event.timestamp, datetime), "timestamp")
    _optional(event.trace_id, _HEX32, "trace_id")
    _optional(event.span_id, _HEX16, "span_id")
    _optional(event.workflow_id, _HEX16, "workflow_id")
    _check(event.correlation_id is None or is_valid_correlation_id(event.correlation_id),
           "correlation_id")  # fmt: skip
    for field in ("conversation_id", "user_id"):
        value = getattr(event, field)
        _check(value is None or is_valid_app_id(value), field)
    _json_object(event.data, "data")
    _json_object(event.metadata, "metadata")
    return event


def event_from_dict(d: Any) -> UnifiedEvent:
    """A validated ``UnifiedEvent`` from a decoded message; raises ``InvalidEvent``."""
    _check(isinstance(d, dict), "message (not an object)")
    known = set(UnifiedEvent.__dataclass_fields__)
    values: dict[str, Any] = {k: v for k, v in d.items() if k in known}
    try:
        values["category"] = EventCategory(values["category"])
        stamp = values["timestamp"]
        _check(isinstance(stamp, str) and len(stamp) <= 64, "timestamp")
        values["timestamp"] = datetime.fromisoformat(stamp)
        event = UnifiedEvent(**values)
    except InvalidEvent:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidEvent(f"invalid message: {type(exc).__name__}") from exc
    return validate_event(event)


def reject(bus: Any, boundary: str, exc: Exception) -> None:
    """Count a dropped event on ``bus`` and say so (once a minute per boundary)."""
    if hasattr(bus, "rejected"):
        bus.rejected += 1
    warn_once(f"events:rejected:{boundary}", "chatter-otel: dropped an event at %s (%s); %d "
              "dropped so far", boundary, exc, getattr(bus, "rejected", 0))  # fmt: skip


def checked(bus: Any, boundary: str, event: UnifiedEvent) -> UnifiedEvent | None:
    """``event`` if valid, else None (dropped and counted)."""
    try:
        return validate_event(event)
    except InvalidEvent as exc:
        reject(bus, boundary, exc)
        return None
