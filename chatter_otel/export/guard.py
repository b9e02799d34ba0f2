"""What stands between a batch processor and its exporter: every lost span counted, and no
request content on spans that other instrumentations made.

``GuardedExporter`` wraps the exporter of each ``BatchSpanProcessor`` that ``configure`` builds:

* **Losses**: a batch the exporter could not deliver after its own retries (``FAILURE``, or an
  exception) is counted as ``export_failed``; spans the processor's full queue dropped are
  counted as ``queue_full`` (the SDK counts those in ``otel.sdk.processor.span.processed`` as
  well; failed exports it does not count at all). Both go into one counter,
  ``chatter.spans.dropped`` with ``error.type``, and into one log line per incident: the first
  loss is said at once, with its count; while it lasts, one line a minute with the totals; the
  first delivery after it says how long it lasted and exactly how many spans it cost.
* **Content**: with content capture and the exception-text opt-in off, spans made by the
  instrumentations ``configure`` turns on (FastAPI/ASGI, SQLAlchemy, httpx, requests: the
  ``opentelemetry.instrumentation.*`` scopes) leave with the exception's class only: its
  message and stack trace are taken out of their ``exception`` events and their status
  description. Done here, on the export thread, not on the app's request path.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Status, StatusCode

from chatter_otel.attributes import SPANS_DROPPED_METRIC
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.metrics import MeterProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = ["GuardedExporter", "scrub"]

_log = logging.getLogger("chatter_otel")

_FOREIGN_SCOPES = "opentelemetry.instrumentation."
_TEXT_KEYS = frozenset((EXCEPTION_MESSAGE, EXCEPTION_STACKTRACE))
_PROGRESS_S = 60.0


def scrub(span: ReadableSpan) -> ReadableSpan:
    """``span`` without exception text, if an instrumentation of ``opentelemetry.instrumentation``
    made it and it carries any; else ``span`` itself."""
    scope = span.instrumentation_scope
    if scope is None or not scope.name.startswith(_FOREIGN_SCOPES):
        return span
    events = span.events
    texty = any(e.name == "exception" and _TEXT_KEYS & set(e.attributes or ()) for e in events)
    attrs = span.attributes or {}
    if not texty and not span.status.description and not _TEXT_KEYS & set(attrs):
        return span
    kept = [_without_text(e) if e.name == "exception" else e for e in events]
    kind = next((str((e.attributes or {}).get(EXCEPTION_TYPE)) for e in events
                 if e.name == "exception" and (e.attributes or {}).get(EXCEPTION_TYPE)),
                None)  # fmt: skip
    kind = kind or (str(attrs[ERROR_TYPE]) if ERROR_TYPE in attrs else None)
    status = span.status
    if status.description:
        status = Status(status.status_code, kind) if status.status_code is StatusCode.ERROR \
            else Status(status.status_code)  # fmt: skip
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes={k: v for k, v in attrs.items() if k not in _TEXT_KEYS}, events=kept,
        links=span.links, kind=span.kind, status=status, start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )  # fmt: skip


def _without_text(event: Any) -> Event:
    attrs = {k: v for k, v in (event.attributes or {}).items() if k not in _TEXT_KEYS}
    return Event(event.name, attrs, event.timestamp)


class _Incident:
    """Losses of one exporter since its last delivery; said as described in the module doc."""

    def __init__(self, exporter: str) -> None:
        self.exporter = exporter
        self.lock = threading.Lock()
        self.since: float | None = None
        self.counts: dict[str, int] = {}
        self.next_line = 0.0

    def lost(self, n: int, why: str) -> None:
        with self.lock:
            now = time.monotonic()
            first = self.since is None
            if first:
                self.since = now
                self.counts = {}
            self.counts[why] = self.counts.get(why, 0) + n
            if not first and now < self.next_line:
                return
            self.next_line = now + _PROGRESS_S
            counts = dict(self.counts)
        _log.warning("chatter-otel: spans are being lost by the %s exporter: %s so far in this "
                     "incident (counted in %s)", self.exporter, _said(counts),
                     SPANS_DROPPED_METRIC)  # fmt: skip

    def delivered(self) -> None:
        if self.since is None:  # no incident: the common case, no lock
            return
        with self.lock:
            if self.since is None:
                return
            took, counts = time.monotonic() - self.since, self.counts
            self.since, self.counts = None, {}
        _log.warning("chatter-otel: the %s exporter delivers again after %.1f s; the incident "
                     "lost %s", self.exporter, took, _said(counts))  # fmt: skip


def _said(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{why}: {n}" for why, n in sorted(counts.items()))
    return f"{total} span(s) ({parts})"


class GuardedExporter(SpanExporter):
    """``inner`` with losses counted and foreign spans scrubbed (module docstring). Call
    ``watch(processor)`` once the ``BatchSpanProcessor`` around it exists, so that its queue's
    drops are counted too."""

    def __init__(self, inner: SpanExporter, name: str, meter_provider: MeterProvider | None,
                 *, scrub_text: bool = True) -> None:  # fmt: skip

        self.inner = inner
        self.name = name
        self.scrub_text = scrub_text
        meter = our_meter(meter_provider)
        self._dropped = meter.create_counter(
            SPANS_DROPPED_METRIC, unit="{span}",
            description="Finished spans that never left the process, by error.type",
        )  # fmt: skip
        self._incident = _Incident(name)

    def lost(self, n: int, why: str) -> None:
        self._dropped.add(n, {ERROR_TYPE: why, "chatter.exporter": self.name})
        self._incident.lost(n, why)

    def watch(self, processor: BatchSpanProcessor) -> None:
        """Count what ``processor``'s queue drops, through the SDK's own hook for it (its
        processor metrics object, which it calls for every dropped span)."""
        inner = getattr(processor, "_batch_processor", None)
        sdk_metrics = getattr(inner, "_metrics", None)
        if inner is None or sdk_metrics is None or not hasattr(sdk_metrics, "drop_items"):
            _log.warning("chatter-otel: this SDK's batch processor cannot be watched; spans its "
                         "full queue drops are counted only in otel.sdk.processor.span."
                         "processed")  # fmt: skip
            return
        inner._metrics = _CountingProcessorMetrics(sdk_metrics, self)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        batch = [scrub(s) for s in spans] if self.scrub_text else spans
        try:
            result = self.inner.export(batch)
        except Exception:
            _log.exception("chatter-otel: the %s exporter raised", self.name)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._incident.delivered()
        else:
            self.lost(len(spans), "export_failed")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _CountingProcessorMetrics:
    """The SDK's processor metrics object, passed through, with each drop counted by us too."""

    def __init__(self, sdk: Any, guard: GuardedExporter) -> None:
        self._sdk = sdk
        self._guard = guard

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        self._sdk.drop_items(count, error_type)
        self._guard.lost(count, error_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sdk, name)


def guard_existing(provider: Any, meter_provider: MeterProvider | None, *, scrub_text: bool) -> int:
    """Guard the exporters of the ``BatchSpanProcessor``s already on ``provider`` (zero-code:
    the distro built them from ``OTEL_TRACES_EXPORTER``); returns how many. An SDK whose
    processors cannot be reached this way is logged, and left as it is."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    multi = getattr(provider, "_active_span_processor", None)
    processors = getattr(multi, "_span_processors", None)
    if processors is None:
        _log.warning("chatter-otel: cannot reach this SDK's span processors; failed exports "
                     "are not counted and other instrumentations' spans not scrubbed")  # fmt: skip
        return 0
    done = 0
    for processor in processors:
        inner = getattr(processor, "_batch_processor", None)
        exporter = getattr(inner, "_exporter", None)
        if not isinstance(processor, BatchSpanProcessor) or exporter is None:
            continue
        if isinstance(exporter, GuardedExporter):
            continue
        module = type(exporter).__module__
        name = ("otlp" if ".otlp." in module else "local" if module.startswith("chatter_otel")
                else type(exporter).__name__)  # fmt: skip
        guard = GuardedExporter(exporter, name, meter_provider, scrub_text=scrub_text)
        inner._exporter = guard  # type: ignore[union-attr]
        guard.watch(processor)
        done += 1
    return done
