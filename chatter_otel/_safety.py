"""Keeping instrumentation faults out of the app: rate-limited logging and a guard decorator."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from chatter_otel._forksafe import fresh_after_fork

_log = logging.getLogger("chatter_otel")

F = TypeVar("F", bound=Callable[..., Any])

_INTERVAL_S = 60.0
_MAX_KEYS = 256  # bounded: keys are code locations and field names, never user data


class _RateLimiter:
    """Lets one log line per key through every ``interval`` seconds and counts the rest."""

    def __init__(self, interval: float = _INTERVAL_S) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")

    def allow(self, key: str) -> int | None:
        """Return the number suppressed since the last line if a line may go out, else None."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            if last is None and len(self._last) >= _MAX_KEYS:
                oldest = next(iter(self._last))
                self._last.pop(oldest)
                self._suppressed.pop(oldest, None)  # both maps bounded by the same keys
            self._last[key] = now
            return self._suppressed.pop(key, 0)


_limiter = _RateLimiter()


def warn_once(key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
    """Log a warning at most once a minute per ``key``, saying how many were suppressed."""
    suppressed = _limiter.allow(key)
    if suppressed is None:
        return
    if suppressed:
        msg += " (%d similar suppressed)"
        args = (*args, suppressed)
    _log.warning(msg, *args, exc_info=exc_info)


class InternalErrors:
    """Faults inside the instrumentation: counted, logged (rate-limited) in production.

    ``strict`` (the test suite sets it) keeps each one in ``seen`` so a test fixture fails the
    test that caused it, the way logfire re-raises its internal errors under pytest. They are
    never raised here: the app's call stack is on the other side of most of these frames, and
    LangChain would swallow a raise from a callback anyway. ``seen`` is bounded.
    """

    def __init__(self) -> None:
        self.count = 0
        self.strict = False
        self.seen: list[str] = []

    def report(self, where: str) -> None:
        self.count += 1
        if self.strict and len(self.seen) < 100:
            import traceback

            self.seen.append(f"{where}: {traceback.format_exc(limit=8)}")
        warn_once(
            f"guard:{where}",
            "chatter-otel: internal error in %s; telemetry for this run may be incomplete",
            where,
            exc_info=True,
        )


internal_errors = InternalErrors()


def internal_error(where: str) -> None:
    """Call from an ``except Exception`` block of instrumentation code."""
    internal_errors.report(where)


def guarded(fn: F) -> F:
    """Run ``fn``; an exception is logged (rate-limited), counted and swallowed, never raised to
    the app. Only for instrumentation code: the app's own exceptions never pass through here.
    """
    where = fn.__qualname__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            internal_errors.report(where)
            return None

    return wrapper  # type: ignore[return-value]
