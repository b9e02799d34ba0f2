"""Typed records: each fact of a run built once, frozen, and carried with its span.

The invocation that owns a span builds its record and hands it to the span processors with the
span itself: ``carry_start`` around ``tracer.start_span`` (processors' ``on_start``) and
``carry_end`` around ``span.end()`` (``on_end``). Processors look a record up with
``started_record(span)`` / ``ended_record(span)``; they never decode span attributes. A record is
only held while the SDK runs the processors (a few microseconds), so nothing here grows.

The start side is a thread-local: the SDK calls ``on_start`` synchronously in the thread that
starts the span (``SynchronousMultiSpanProcessor``, what ``TracerProvider`` uses). The end side
is keyed by span id, so a ``ConcurrentMultiSpanProcessor`` calling ``on_end`` from its own
threads finds it too.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from chatter_otel.instrumentation.runs import EMPTY_IDS, RunIds

if TYPE_CHECKING:
    from collections.abc import Iterator
    from decimal import Decimal

__all__ = [
    "EmbeddingsRecord",
    "LLMCallRecord",
    "NodeRecord",
    "Record",
    "RetrievalRecord",
    "ToolCallRecord",
    "WorkflowRecord",
    "WorkflowStart",
    "ended_record",
    "started_record",
]

# Outcomes: how an operation ended. Interrupts and LangGraph's Command are not failures.
OK, ERROR, INTERRUPTED, CANCELLED, ORPHANED = "ok", "error", "interrupted", "cancelled", "orphaned"


def workflow_span_name(name: str, agent: bool) -> str:
    return f"invoke_agent {name}" if agent else f"invoke_workflow {name}"


@dataclass(frozen=True, slots=True)
class _Common:
    span_id: str  # 16 hex
    trace_id: str  # 32 hex
    workflow_id: str | None  # span id of the run's outermost workflow; None outside any run
    ids: RunIds
    start_ns: int  # wall clock, as on the span
    end_ns: int
    status: str  # OK, ERROR, INTERRUPTED, CANCELLED or ORPHANED
    error_type: str | None
    error_message: str | None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def failed(self) -> bool:
        return self.status in (ERROR, ORPHANED)


@dataclass(frozen=True, slots=True)
class WorkflowStart:
    """A workflow span starting (``on_start``): what is known before it runs. Its span and
    trace ids are the span's own (not known before ``start_span`` returns); the workflow id of
    an outermost run is its span id."""

    name: str
    outermost: bool
    ids: RunIds = EMPTY_IDS
    agent: bool = False  # an agent's run (``invoke_agent``), not a plain workflow

    @property
    def span_name(self) -> str:
        return workflow_span_name(self.name, self.agent)


@dataclass(frozen=True, slots=True)
class WorkflowRecord(_Common):
    """A finished workflow (graph run or ``track_workflow``) with its rolled-up usage."""

    name: str
    outermost: bool
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    cost: Decimal | None
    cost_currency: str | None
    provider: str | None
    model: str | None
    llm_calls: int
    tool_calls: int
    agent: bool = False  # an agent's run (``invoke_agent``); ``name`` is the agent's name

    @property
    def span_name(self) -> str:
        return workflow_span_name(self.name, self.agent)


@dataclass(frozen=True, slots=True)
class NodeRecord(_Common):
    name: str
    step: int | None


@dataclass(frozen=True, slots=True)
class LLMCallRecord(_Common):
    """One LLM call. Token counts are None when the provider reported none (never invented);
    ``total_tokens`` follows the one rule in ``instrumentation.usage``."""

    operation: str
    provider: str | None
    request_model: str | None
    response_model: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    cache_read_tokens: int | None
    cache_creation_tokens: int | None
    reasoning_tokens: int | None
    usage_reported: bool
    cost: Decimal | None
    cost_currency: str | None
    cost_source: str | None
    finish_reasons: tuple[str, ...]
    streaming: bool
    time_to_first_chunk_s: float | None
    chunk_gaps_s: tuple[float, ...] = ()  # between a stream's chunks after the first
    cost_table: str | None = None  # the price table a computed cost came from
    # The counts are an opt-in estimate (instrumentation/estimate.py), not the provider's; its
    # counter's name. ``usage_reported`` stays False: the provider reported nothing.
    usage_estimated: bool = False
    estimator: str | None = None

    @property
    def model(self) -> str | None:
        """The model that answered, else the one asked for."""
        return self.response_model or self.request_model


@dataclass(frozen=True, slots=True)
class ToolCallRecord(_Common):
    name: str
    call_id: str | None


@dataclass(frozen=True, slots=True)
class RetrievalRecord(_Common):
    data_source: str
    documents: int


@dataclass(frozen=True, slots=True)
class EmbeddingsRecord(_Common):
    """One embeddings call. Counted by the GenAI metrics (tokens, duration, cost); never part
    of a run's chat usage, so the ledger, monitoring and events leave it alone."""

    provider: str
    request_model: str | None
    response_model: str | None
    input_tokens: int | None
    cost: Decimal | None
    operation: str = "embeddings"
    output_tokens: None = None  # the shape the metrics read, as for an LLM call
    time_to_first_chunk_s: None = None
    chunk_gaps_s: tuple[float, ...] = ()


Record = Union[  # noqa: UP007
    WorkflowRecord, NodeRecord, LLMCallRecord, ToolCallRecord, RetrievalRecord, EmbeddingsRecord
]

_starting = threading.local()
_ending: dict[int, Record] = {}


@contextmanager
def carry_start(start: WorkflowStart | None) -> Iterator[None]:
    """Make ``start`` visible to the processors' ``on_start`` while a span starts here."""
    prev = getattr(_starting, "record", None)
    _starting.record = start
    try:
        yield
    finally:
        _starting.record = prev


def started_record() -> WorkflowStart | None:
    """The start record of the span whose ``on_start`` runs now in this thread, if ours."""
    rec: WorkflowStart | None = getattr(_starting, "record", None)
    return rec


def end_with(span: Any, record: Record | None, end_ns: int) -> None:
    """End ``span`` at ``end_ns`` with ``record`` visible to the processors' ``on_end``."""
    if record is None:
        span.end(end_time=end_ns)
        return
    key = span.get_span_context().span_id
    _ending[key] = record
    try:
        span.end(end_time=end_ns)
    finally:
        _ending.pop(key, None)


def ended_record(span: Any) -> Record | None:
    return _ending.get(span.context.span_id)
