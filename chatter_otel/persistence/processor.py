"""The span processor that feeds the ledger from the records of our spans."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from chatter_otel.instrumentation.records import LLMCallRecord, WorkflowRecord
from chatter_otel.persistence.schema import ledger_row, run_row
from chatter_otel.sinks.dispatch import RecordSpanProcessor

if TYPE_CHECKING:
    from chatter_otel.instrumentation.records import Record

_log = logging.getLogger("chatter_otel")

__all__ = ["LedgerSpanProcessor"]


class LedgerSpanProcessor(RecordSpanProcessor):
    """LLM call records -> ledger rows; outermost workflow records -> run rows."""

    def __init__(self, persistence: Any | None) -> None:
        self.persistence = persistence

    def repoint(self, persistence: Any | None = None, **_: Any) -> None:
        self.persistence = persistence

    def detach(self) -> None:
        self.persistence = None

    def ended(self, rec: Record) -> None:
        persistence = self.persistence
        if persistence is None:
            return
        if isinstance(rec, LLMCallRecord):
            persistence.submit("llm", ledger_row(rec))
        elif isinstance(rec, WorkflowRecord) and rec.outermost:
            persistence.submit("run", run_row(rec))
