"""The span processors' side of the records: what each sink processor is built on.

A ``RecordSpanProcessor`` sees every span of ours (they are at least ``RECORD_ONLY``) and takes
the typed record the invocation carried with it; spans that are not ours (the app's, the HTTP
server's) carry no record and are passed over at the cost of one dictionary lookup. Subclasses
implement ``workflow_started`` and ``ended``; a fault inside one is counted and logged and never
reaches the code that ended the span.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import SpanProcessor

from chatter_otel._safety import internal_error
from chatter_otel.instrumentation.records import ended_record, started_record

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span

    from chatter_otel.instrumentation.records import Record, WorkflowStart

__all__ = ["RecordSpanProcessor"]


class RecordSpanProcessor(SpanProcessor):
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        start = started_record()
        if start is None:
            return
        try:
            ctx = span.get_span_context()
            self.workflow_started(start, format(ctx.span_id, "016x"), format(ctx.trace_id, "032x"))
        except Exception:
            internal_error(f"{type(self).__name__}.workflow_started")

    def on_end(self, span: ReadableSpan) -> None:
        record = ended_record(span)
        if record is None:
            return
        try:
            self.ended(record)
        except Exception:
            internal_error(f"{type(self).__name__}.ended")

    def workflow_started(self, start: WorkflowStart, span_id: str, trace_id: str) -> None:
        """A workflow span of ours started; ``span_id`` is the run's workflow id when
        ``start.outermost``."""

    def ended(self, record: Record) -> None:
        """A span of ours ended, with its record."""

    def repoint(self, **sinks: Any) -> None:
        """Feed ``sinks`` from now on (a new ``configure`` on the same provider)."""

    def detach(self) -> None:
        """Stop feeding anything (processors cannot be removed from a provider)."""
