"""The span processors' side of the records: what each sink processor is built on.

A ``RecordSpanProcessor`` sees every span of ours (they are at least ``RECORD_ONLY``) and takes
the typed record the invocation carried with it; spans that are not ours (the app's, the HTTP
server's) carry no record and are passed over at the cost of one dictionary lookup. Subclasses
implement ``workflow_started`` and ``ended``; a fault inside one is counted and logged and never
reaches the code that ended the span.

``configure`` puts ONE ``RecordFanout`` on the provider and attaches the sinks' processors to
it, rather than each to the provider: the SDK calls every processor of a provider three times
for every span (``on_start``, ``_on_ending``, ``on_end``), the app's SQL and server spans
included, so four sink processors cost four lookups per span where one does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import SpanProcessor

from chatter_otel._safety import internal_error
from chatter_otel.instrumentation.records import ended_record, started_record

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span

    from chatter_otel.instrumentation.records import Record, WorkflowStart

__all__ = ["RecordFanout", "RecordSpanProcessor"]


def _hand_start(sinks: tuple[RecordSpanProcessor, ...], span: Span) -> None:
    """A workflow span of ours started: its start record to each sink (none for other spans)."""
    start = started_record()
    if start is None:
        return
    ctx = span.get_span_context()
    span_id, trace_id = format(ctx.span_id, "016x"), format(ctx.trace_id, "032x")
    for sink in sinks:
        try:
            sink.workflow_started(start, span_id, trace_id)
        except Exception:
            internal_error(f"{type(sink).__name__}.workflow_started")


def _hand_end(sinks: tuple[RecordSpanProcessor, ...], span: ReadableSpan) -> None:
    """A span of ours ended: its record to each sink (nothing for other spans)."""
    record = ended_record(span)
    if record is None:
        return
    for sink in sinks:
        try:
            sink.ended(record)
        except Exception:
            internal_error(f"{type(sink).__name__}.ended")


class RecordSpanProcessor(SpanProcessor):
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        _hand_start((self,), span)

    def on_end(self, span: ReadableSpan) -> None:
        _hand_end((self,), span)

    def workflow_started(self, start: WorkflowStart, span_id: str, trace_id: str) -> None:
        """A workflow span of ours started; ``span_id`` is the run's workflow id when
        ``start.outermost``."""

    def ended(self, record: Record) -> None:
        """A span of ours ended, with its record."""

    def repoint(self, **sinks: Any) -> None:
        """Feed ``sinks`` from now on (a new ``configure`` on the same provider)."""

    def detach(self) -> None:
        """Stop feeding anything (processors cannot be removed from a provider)."""


class RecordFanout(SpanProcessor):
    """The one processor ``configure`` adds for all the sinks: a span's record is looked up
    once and handed to each sink in the order it was attached; a span that is not ours costs
    one lookup in all. A sink's fault is counted and logged, and the other sinks still run."""

    def __init__(self) -> None:
        self.sinks: dict[str, RecordSpanProcessor] = {}
        self._order: tuple[RecordSpanProcessor, ...] = ()

    def attach(self, kind: str, processor: RecordSpanProcessor) -> None:
        self.sinks[kind] = processor
        self._order = tuple(self.sinks.values())

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        _hand_start(self._order, span)

    def on_end(self, span: ReadableSpan) -> None:
        _hand_end(self._order, span)

    def shutdown(self) -> None:
        for sink in self._order:
            sink.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000
        flushed = True
        for sink in self._order:
            left = max(int((deadline - time.monotonic()) * 1000), 0)
            flushed = sink.force_flush(left) and flushed
        return flushed
