"""The app's MonitoringService, driven from spans.

``MonitoringSpanProcessor`` calls any object with the app's monitoring API:

* ``start_workflow_tracking(user_id, conversation_id, provider_name="", model_name="",
  workflow_config=None, correlation_id="") -> workflow_id`` once per run (its outermost workflow),
* ``update_workflow_metrics(workflow_id, token_usage={provider: tokens}, tool_calls=n,
  error="...")`` as LLM and tool calls finish (values add up),
* ``record_llm_operation(LLMMetrics(...))`` once per LLM call,
* ``finish_workflow_tracking(workflow_id)`` once per run.

The calls run in order on a background worker, never on the app's thread: a service that raises
is logged, one that is slow only backs up its own bounded queue. ``MonitoringService`` is the
built-in, in-memory and bounded implementation, with ``get_workflow_stats()``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_CONVERSATION_ID,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_WORKFLOW_NAME,
    GenAiOperationNameValues,
)
from opentelemetry.semconv._incubating.attributes.user_attributes import USER_ID
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import StatusCode

from chatter_otel._lifecycle import WorkflowScopes, duration_ns, model_of
from chatter_otel._safety import guarded
from chatter_otel._worker import SinkWorker
from chatter_otel.attributes import CHATTER_CORRELATION_ID, GEN_AI_USAGE_COST_AMOUNT

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, Span

__all__ = ["LLMMetrics", "MonitoringService", "MonitoringSpanProcessor", "WorkflowMetrics"]

_CHAT = GenAiOperationNameValues.CHAT.value
_TOOL = GenAiOperationNameValues.EXECUTE_TOOL.value
_MAX_KEYS = 1_000  # providers/models tracked before the rest count as "other"


@dataclass(frozen=True)
class LLMMetrics:
    timestamp: datetime
    provider: str
    model: str
    operation: str
    input_tokens: int
    output_tokens: int
    duration_ms: float
    cost_estimate: float | None
    correlation_id: str


@dataclass
class WorkflowMetrics:
    workflow_id: str
    user_id: str
    conversation_id: str
    provider_name: str = ""
    model_name: str = ""
    correlation_id: str = ""
    workflow_config: dict[str, Any] | None = None
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    token_usage: dict[str, int] = field(default_factory=dict)
    tool_calls: int = 0
    retrieval_context_size: int = 0
    memory_usage_mb: float = 0.0
    errors: list[str] = field(default_factory=list)
    user_satisfaction: float | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.token_usage.values())

    @property
    def duration_ms(self) -> float | None:
        return None if self.end_time is None else (self.end_time - self.start_time) * 1000


@dataclass
class _Totals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    duration_ms: float = 0.0


class MonitoringService:
    """The built-in, in-memory MonitoringService. Bounded: at most ``max_active`` open runs
    (the oldest is finished early when more start), the last ``history`` finished ones, and
    ``_MAX_KEYS`` providers and models."""

    def __init__(self, max_active: int = 10_000, history: int = 1_000) -> None:
        self._active: OrderedDict[str, WorkflowMetrics] = OrderedDict()
        self._finished: deque[WorkflowMetrics] = deque(maxlen=history)
        self._max_active = max_active
        self._by_provider: dict[str, _Totals] = {}
        self._by_model: dict[str, _Totals] = {}
        self._ops = {"started": 0, "finished": 0, "failed": 0, "evicted": 0}
        self._lock = threading.Lock()
        self._ids = 0

    def start_workflow_tracking(  # noqa: PLR0917 - the app's monitoring API, as it is
        self,
        user_id: str,
        conversation_id: str,
        provider_name: str = "",
        model_name: str = "",
        workflow_config: dict[str, Any] | None = None,
        correlation_id: str = "",
    ) -> str:
        with self._lock:
            self._ids += 1
            workflow_id = f"wf-{self._ids}"
            self._active[workflow_id] = WorkflowMetrics(
                workflow_id, user_id, conversation_id, provider_name, model_name, correlation_id,
                workflow_config,
            )  # fmt: skip
            self._ops["started"] += 1
            while len(self._active) > self._max_active:
                _, old = self._active.popitem(last=False)
                old.end_time = time.time()
                self._finished.append(old)
                self._ops["evicted"] += 1
        return workflow_id

    def update_workflow_metrics(  # noqa: PLR0917 - the app's monitoring API, as it is
        self,
        workflow_id: str,
        token_usage: dict[str, int] | None = None,
        tool_calls: int | None = None,
        retrieval_context_size: int | None = None,
        memory_usage_mb: float | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            wf = self._active.get(workflow_id)
            if wf is None:
                return
            for provider, tokens in (token_usage or {}).items():
                wf.token_usage[provider] = wf.token_usage.get(provider, 0) + tokens
            wf.tool_calls += tool_calls or 0
            wf.retrieval_context_size += retrieval_context_size or 0
            wf.memory_usage_mb += memory_usage_mb or 0
            if error:
                wf.errors.append(error)

    def finish_workflow_tracking(
        self, workflow_id: str, user_satisfaction: float | None = None
    ) -> WorkflowMetrics | None:
        with self._lock:
            wf = self._active.pop(workflow_id, None)
            if wf is None:
                return None
            wf.end_time = time.time()
            wf.user_satisfaction = user_satisfaction
            self._finished.append(wf)
            self._ops["finished"] += 1
            if wf.errors:
                self._ops["failed"] += 1
        return wf

    def record_llm_operation(self, metrics: LLMMetrics) -> None:
        with self._lock:
            pairs = ((self._by_provider, metrics.provider), (self._by_model, metrics.model))
            for table, name in pairs:
                key = name if name in table or len(table) < _MAX_KEYS else "other"
                t = table.setdefault(key, _Totals())
                t.calls += 1
                t.input_tokens += metrics.input_tokens
                t.output_tokens += metrics.output_tokens
                t.cost += metrics.cost_estimate or 0.0
                t.duration_ms += metrics.duration_ms

    def get_workflow_stats(self) -> dict[str, Any]:
        def table(d: dict[str, _Totals]) -> dict[str, dict[str, Any]]:
            return {k: vars(v).copy() for k, v in d.items()}

        with self._lock:
            return {
                "workflow_ops": {**self._ops, "active": len(self._active)},
                "providers": table(self._by_provider),
                "models": table(self._by_model),
                "recent": list(self._finished)[-20:],
            }


class MonitoringSpanProcessor(SpanProcessor):
    """Spans -> calls into ``service`` (any object with the monitoring API), off-thread."""

    def __init__(self, service: Any, worker: SinkWorker | None = None) -> None:
        self.service = service
        self.worker = worker or SinkWorker("monitoring")
        self._scopes = WorkflowScopes()
        self._ids: dict[str, Any] = {}  # our workflow id -> the service's (worker thread only)

    @guarded
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        workflow_id, opens = self._scopes.enter(span)
        if opens:
            a = span.attributes or {}
            self.worker.submit(
                self._start, workflow_id, str(a.get(USER_ID) or ""),
                str(a.get(GEN_AI_CONVERSATION_ID) or ""), str(a.get(CHATTER_CORRELATION_ID) or ""),
                {"workflow_name": a.get(GEN_AI_WORKFLOW_NAME)},
            )  # fmt: skip

    def _start(self, ours: str, user: str, conversation: str, correlation: str, cfg: Any) -> None:
        self._ids[ours] = self.service.start_workflow_tracking(
            user, conversation, workflow_config=cfg, correlation_id=correlation
        )

    def _call(self, ours: str, method: str, *args: Any, **kwargs: Any) -> None:
        theirs = self._ids.get(ours)
        if theirs is not None:
            getattr(self.service, method)(theirs, *args, **kwargs)

    def _finish(self, ours: str) -> None:
        theirs = self._ids.pop(ours, None)
        if theirs is not None:
            self.service.finish_workflow_tracking(theirs)

    @guarded
    def on_end(self, span: ReadableSpan) -> None:
        workflow_id, closes = self._scopes.leave(span)
        if workflow_id is None:
            return
        a = span.attributes or {}
        op = a.get(GEN_AI_OPERATION_NAME)
        error = a.get(ERROR_TYPE) if span.status.status_code is StatusCode.ERROR else None
        submit = self.worker.submit
        if op == _CHAT:
            provider = str(a.get(GEN_AI_PROVIDER_NAME) or "unknown")
            tin, tout = a.get(GEN_AI_USAGE_INPUT_TOKENS), a.get(GEN_AI_USAGE_OUTPUT_TOKENS)
            metrics = LLMMetrics(
                timestamp=datetime.fromtimestamp((span.end_time or 0) / 1e9, tz=timezone.utc),
                provider=provider,
                model=str(model_of(a) or ""),
                operation=_CHAT, input_tokens=int(tin or 0), output_tokens=int(tout or 0),
                duration_ms=duration_ns(span) / 1e6,
                cost_estimate=a.get(GEN_AI_USAGE_COST_AMOUNT),
                correlation_id=str(a.get(CHATTER_CORRELATION_ID) or ""),
            )  # fmt: skip
            submit(self.service.record_llm_operation, metrics)
            if tin is not None or tout is not None:
                usage = {provider: int(tin or 0) + int(tout or 0)}
                submit(self._call, workflow_id, "update_workflow_metrics", token_usage=usage)
        elif op == _TOOL:
            submit(self._call, workflow_id, "update_workflow_metrics", tool_calls=1)
        if error and (op in (_CHAT, _TOOL) or closes):
            submit(self._call, workflow_id, "update_workflow_metrics", error=str(error))
        if closes:
            submit(self._finish, workflow_id)

    def repoint(self, service: Any) -> None:
        """Report to ``service`` from now on (a new ``configure`` on the same provider)."""
        if self.worker.stopped:
            self.worker = SinkWorker("monitoring")
        self.service = service

    def detach(self) -> None:
        """Stop reporting (processors cannot be removed from a provider); ends the worker."""
        self.service = _NoService()
        self._scopes.clear()
        self.worker.stop()

    def shutdown(self) -> None:
        self.worker.flush(2.0)
        self.worker.stop()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.worker.flush(timeout_millis / 1000)


class _NoService:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
