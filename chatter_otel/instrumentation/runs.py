"""Workflow runs as the app sees them: ids, rolled-up usage, trace id, and the last finished run."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_CONVERSATION_ID,
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
)
from opentelemetry.semconv._incubating.attributes.user_attributes import USER_ID

from chatter_otel.attributes import (
    CHATTER_CORRELATION_ID,
    CHATTER_LLM_CALLS,
    CHATTER_MESSAGE_ID,
    CHATTER_TOOL_CALLS,
    CHATTER_USAGE_ESTIMATED,
    CHATTER_USAGE_TOTAL_TOKENS,
    GEN_AI_USAGE_COST_AMOUNT,
    GEN_AI_USAGE_COST_CURRENCY,
    GEN_AI_USAGE_COST_SOURCE,
)

if TYPE_CHECKING:
    from decimal import Decimal

    from opentelemetry.trace import Span

    from chatter_otel.instrumentation.records import LLMCallRecord, WorkflowRecord

__all__ = ["RunIds", "RunUsage", "WorkflowRun", "last_run"]


@dataclass(frozen=True, slots=True)
class RunIds:
    """The app ids a run belongs to; any may be unknown."""

    conversation_id: str | None = None
    message_id: str | None = None
    user_id: str | None = None
    correlation_id: str | None = None

    def merged_over(self, base: RunIds | None) -> RunIds:
        """These ids, with gaps filled from ``base``."""
        if base is None or base is self:
            return self
        return RunIds(
            self.conversation_id or base.conversation_id,
            self.message_id or base.message_id,
            self.user_id or base.user_id,
            self.correlation_id or base.correlation_id,
        )

    def attributes(self) -> dict[str, str]:
        attrs: dict[str, str] = {}
        if self.conversation_id:
            attrs[GEN_AI_CONVERSATION_ID] = self.conversation_id
        if self.message_id:
            attrs[CHATTER_MESSAGE_ID] = self.message_id
        if self.user_id:
            attrs[USER_ID] = self.user_id
        if self.correlation_id:
            attrs[CHATTER_CORRELATION_ID] = self.correlation_id
        return attrs


EMPTY_IDS = RunIds()
MAX_CALLS_KEPT = 10_000  # per run; calls beyond reach the ledger through its worker only


@dataclass(slots=True)
class RunUsage:
    """Usage of a whole workflow, in the app's column names.

    Token fields are ``None`` until some LLM call reported usage (never invented zeros). ``cost``
    sums the calls that could be priced and is ``None`` when none could. ``provider`` and
    ``model`` and ``finish_reason`` are those of the last LLM call (the one that wrote the
    answer).
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: Decimal | None = None
    cost_currency: str | None = None
    cost_source: str | None = None
    provider: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    response_time_ms: int | None = None
    llm_calls: int = 0
    tool_calls: int = 0
    usage_missing_calls: int = 0
    usage_estimated_calls: int = 0  # calls whose counts are an opt-in estimate


def _add(a: int | None, b: int | None) -> int | None:
    if b is None:
        return a
    return b if a is None else a + b


@dataclass(eq=False)
class WorkflowRun:
    """One workflow run: ``track_workflow`` returns it; ``last_run()`` gives the last one.

    ``usage`` is final once ``status`` is no longer ``"running"``. ``trace_id`` is the 32-hex
    trace id (None when tracing was off); ``workflow_id`` the 16-hex span id of its
    ``invoke_workflow`` span, which also keys the run in events and ledgers.
    """

    name: str
    ids: RunIds = EMPTY_IDS
    usage: RunUsage = field(default_factory=RunUsage)
    trace_id: str | None = None
    workflow_id: str | None = None
    status: str = "running"
    error_type: str | None = None
    finished_at: float | None = None  # time.time() when it ended
    bound_message_id: str | None = None  # set once its usage landed on an app message row
    # The workflow id of the outermost run this one belongs to (its own, when outermost).
    root_id: str | None = field(default=None, repr=False)
    # Its LLM calls' records (nested runs' included; bounded) and its own record once ended:
    # what the ledger writes inside the app's transaction when the app saves the message.
    calls: list[LLMCallRecord] = field(default_factory=list, repr=False)
    record: WorkflowRecord | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def conversation_id(self) -> str | None:
        return self.ids.conversation_id

    @property
    def message_id(self) -> str | None:
        return self.ids.message_id

    @property
    def user_id(self) -> str | None:
        return self.ids.user_id

    @property
    def correlation_id(self) -> str | None:
        return self.ids.correlation_id

    # -- accumulation (called by the instrumentation; parallel nodes call it from threads) --

    def add_llm_call(self, call: LLMCallRecord) -> None:
        reasons = call.finish_reasons
        one = RunUsage(
            prompt_tokens=call.input_tokens, completion_tokens=call.output_tokens,
            total_tokens=call.total_tokens, cache_read_tokens=call.cache_read_tokens,
            cache_creation_tokens=call.cache_creation_tokens,
            reasoning_tokens=call.reasoning_tokens, cost=call.cost,
            cost_currency=call.cost_currency, cost_source=call.cost_source,
            provider=call.provider, model=call.model,
            finish_reason=reasons[-1] if reasons else None, llm_calls=1,
            usage_missing_calls=0 if call.usage_reported or call.usage_estimated else 1,
            usage_estimated_calls=1 if call.usage_estimated else 0,
        )  # fmt: skip
        with self._lock:
            if len(self.calls) < MAX_CALLS_KEPT:
                self.calls.append(call)
            self._merge(one)

    def add_tool_call(self) -> None:
        with self._lock:
            self.usage.tool_calls += 1

    def merge_child(self, child: WorkflowRun) -> None:
        """Roll a finished nested workflow up into this one."""
        with self._lock:
            self.calls.extend(child.calls[: max(MAX_CALLS_KEPT - len(self.calls), 0)])
            self._merge(child.usage)

    def _merge(self, c: RunUsage) -> None:
        """Add ``c`` (one call's usage, or a nested run's) to this run's; under the lock."""
        u = self.usage
        u.llm_calls += c.llm_calls
        u.tool_calls += c.tool_calls
        u.usage_missing_calls += c.usage_missing_calls
        u.usage_estimated_calls += c.usage_estimated_calls
        u.prompt_tokens = _add(u.prompt_tokens, c.prompt_tokens)
        u.completion_tokens = _add(u.completion_tokens, c.completion_tokens)
        u.total_tokens = _add(u.total_tokens, c.total_tokens)
        u.cache_read_tokens = _add(u.cache_read_tokens, c.cache_read_tokens)
        u.cache_creation_tokens = _add(u.cache_creation_tokens, c.cache_creation_tokens)
        u.reasoning_tokens = _add(u.reasoning_tokens, c.reasoning_tokens)
        if c.cost is not None:
            u.cost = c.cost if u.cost is None else u.cost + c.cost
            u.cost_currency = c.cost_currency
            # Any locally computed part makes the sum an estimate.
            src = c.cost_source
            u.cost_source = src if u.cost_source in (None, src) else "local"
        u.provider = c.provider or u.provider
        u.model = c.model or u.model
        u.finish_reason = c.finish_reason or u.finish_reason

    def rollup_attributes(self) -> dict[str, Any]:
        u = self.usage
        attrs: dict[str, Any] = {
            CHATTER_LLM_CALLS: u.llm_calls,
            CHATTER_TOOL_CALLS: u.tool_calls,
        }
        for key, value in (
            (CHATTER_USAGE_TOTAL_TOKENS, u.total_tokens),
            (GEN_AI_USAGE_INPUT_TOKENS, u.prompt_tokens),
            (GEN_AI_USAGE_OUTPUT_TOKENS, u.completion_tokens),
            (GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, u.cache_read_tokens),
            (GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, u.cache_creation_tokens),
            (GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, u.reasoning_tokens),
        ):
            if value is not None:
                attrs[key] = value
        if u.cost is not None:
            attrs[GEN_AI_USAGE_COST_AMOUNT] = float(u.cost)
            attrs[GEN_AI_USAGE_COST_CURRENCY] = u.cost_currency
            attrs[GEN_AI_USAGE_COST_SOURCE] = u.cost_source
        if u.usage_estimated_calls:
            attrs[CHATTER_USAGE_ESTIMATED] = True
        return attrs

    def bind_span(self, span: Span) -> None:
        ctx = span.get_span_context()
        if ctx.is_valid:
            self.trace_id = format(ctx.trace_id, "032x")
            self.workflow_id = format(ctx.span_id, "016x")


# The innermost workflow of the current context (track_workflow's run), for ids and roll-ups.
current_workflow: ContextVar[WorkflowRun | None] = ContextVar(
    "chatter_otel_current_workflow", default=None
)


class RunSlot:
    """Where a finished outermost run is left for ``last_run()``.

    LangChain runs async callbacks under ``asyncio.shield``, that is in another task with a
    copy of the context, so a ContextVar set when the run ends would never reach the app. The
    slot is made and set in the app's own context when the run starts; the end fills it in.
    """

    __slots__ = ("run",)

    def __init__(self, run: WorkflowRun | None) -> None:
        self.run = run


_last: ContextVar[RunSlot | None] = ContextVar("chatter_otel_last_run", default=None)


def new_slot() -> RunSlot:
    """A fresh slot for a run starting in the current context; it shows the previous run until
    the new one ends, so concurrent tasks never share one."""
    prev = _last.get()
    slot = RunSlot(prev.run if prev is not None else None)
    _last.set(slot)
    return slot


def set_last_run(run: WorkflowRun) -> None:
    _last.set(RunSlot(run))


def last_run() -> WorkflowRun | None:
    """The last outermost workflow run that finished in the current context, or None.

    For an app that runs ``graph.invoke``/``ainvoke``/``stream``/``astream`` without
    ``track_workflow``: read the usage right after the call returns, in the same thread or
    asyncio task that made it.
    """
    slot = _last.get()
    return slot.run if slot is not None else None
