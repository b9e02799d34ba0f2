"""What crosses the process boundary in headers, both ways.

* **Out**: ``OutboundBaggage`` wraps the global propagator so that outbound calls (the model
  client's included) carry only the baggage the app chose to send: our correlation id (when
  it is a valid one) and the keys in ``propagate_baggage_keys`` (``configure``) or
  ``CHATTER_OTEL_PROPAGATE_BAGGAGE_KEYS`` (comma-separated). Whatever else a client put in the
  request's ``baggage`` header stays in this process: it is readable by the app, never
  forwarded to an LLM provider or any other service. ``traceparent``/``tracestate`` pass as
  the inner propagator makes them.
* **In, in the logs**: the API's own loggers for ``traceparent``, ``tracestate`` and
  ``baggage`` write header text that the client chose (markup, terminal escapes, kilobytes).
  On those loggers each kind of line passes at most once a minute, with every header value
  replaced by its length.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, context, propagate
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)

from chatter_otel.attributes import CHATTER_CORRELATION_ID
from chatter_otel.correlation import is_valid_correlation_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from opentelemetry.context import Context

__all__ = ["ENV_PROPAGATE_BAGGAGE_KEYS", "OutboundBaggage", "filter_outbound_baggage",
           "throttle_hostile_header_logs"]  # fmt: skip

ENV_PROPAGATE_BAGGAGE_KEYS = "CHATTER_OTEL_PROPAGATE_BAGGAGE_KEYS"


class OutboundBaggage(TextMapPropagator):
    """``inner`` with the baggage it injects cut down to the allowed keys (module docstring)."""

    def __init__(self, inner: TextMapPropagator, allowed: Iterable[str] = ()) -> None:
        self.inner = inner
        self.allowed = frozenset(allowed) | {CHATTER_CORRELATION_ID}

    def extract(
        self, carrier: CarrierT, context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:  # fmt: skip
        return self.inner.extract(carrier, context, getter)

    def inject(
        self, carrier: CarrierT, context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:  # fmt: skip
        ctx = context if context is not None else _current()
        entries = baggage.get_all(ctx)
        if entries:
            ctx = baggage.clear(ctx)
            for key, value in entries.items():
                if key in self.allowed and (
                    key != CHATTER_CORRELATION_ID or is_valid_correlation_id(value)
                ):
                    ctx = baggage.set_baggage(key, value, ctx)
        self.inner.inject(carrier, ctx, setter)

    @property
    def fields(self) -> set[str]:
        return self.inner.fields


def _current() -> Context:
    return context.get_current()


def filter_outbound_baggage(allowed: Iterable[str] | None = None) -> Callable[[], None]:
    """Wrap the global propagator (once; a second call only changes the allowed keys); returns
    how to put the previous one back. ``allowed`` None: ``CHATTER_OTEL_PROPAGATE_BAGGAGE_KEYS``."""
    if allowed is None:
        raw = os.environ.get(ENV_PROPAGATE_BAGGAGE_KEYS, "")
        allowed = [k.strip() for k in raw.split(",") if k.strip()]
    current = propagate.get_global_textmap()
    if isinstance(current, OutboundBaggage):
        before = current.allowed
        current.allowed = frozenset(allowed) | {CHATTER_CORRELATION_ID}

        def restore_keys() -> None:
            current.allowed = before

        return restore_keys
    propagate.set_global_textmap(OutboundBaggage(current, allowed))

    def restore() -> None:
        propagate.set_global_textmap(current)

    return restore


class _HostileHeaderLogFilter(logging.Filter):
    """Each kind of line at most once a minute; header text never written raw (module doc)."""

    def __init__(self, interval_s: float = 60.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= 64:  # bounded: keys are the library's formats
            self._last.pop(next(iter(self._last)))
            self._suppressed.clear()
        self._last[key] = now
        if isinstance(record.args, tuple):
            record.args = tuple(_length_of(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _length_of(v) for k, v in record.args.items()}
        record.msg = _printable(str(record.msg))
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar suppressed)"
        return True


def _length_of(value: Any) -> Any:
    return f"<{len(value)} chars>" if isinstance(value, str | bytes) else value


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:500])


# The API's loggers that write request header text: baggage, tracestate, traceparent.
HEADER_LOGGERS = (
    "opentelemetry.baggage.propagation",
    "opentelemetry.trace.span",
    "opentelemetry.trace.propagation.tracecontext",
)


def throttle_hostile_header_logs() -> None:
    """Install the filter on each of ``HEADER_LOGGERS`` once (``configure`` and the
    instrumentor, so zero-code apps too)."""
    for name in HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HostileHeaderLogFilter) for f in logger.filters):
            logger.addFilter(_HostileHeaderLogFilter())
