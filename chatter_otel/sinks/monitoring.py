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

import logging
import threading
import time
import typing
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.records import (
    LLMCallRecord,
    ToolCallRecord,
    WorkflowRecord,
)
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.sinks.fill import app_tracking
from chatter_otel.sinks.worker import SinkWorker

if TYPE_CHECKING:
    from chatter_otel.instrumentation.records import Record, WorkflowStart

_log = logging.getLogger("chatter_otel")

__all__ = ["LLMMetrics", "MonitoringService", "MonitoringSpanProcessor", "WorkflowMetrics"]

_MAX_OPEN = 50_000  # runs open at once in the processor's id map
_MAX_KEYS = 1_000  # providers/models tracked before the rest count as "other"


@dataclass(frozen=True)
class LLMMetrics:
    timestamp: datetime
    provider: str
    model: str
    operation: str
    input_tokens: int | None  # None: the provider reported no usage (never an invented 0)
    output_tokens: int | None
    duration_ms: float
    cost_estimate: float | None
    correlation_id: str
    usage_estimated: bool = False  # the token counts are an opt-in estimate (estimate_usage)


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
    calls_without_usage: int = 0  # their tokens are unknown, not 0
    calls_estimated: int = 0  # their tokens are an opt-in estimate (estimate_usage)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    duration_ms: float = 0.0


class MonitoringService:
    """The built-in, in-memory MonitoringService. Bounded on write: at most ``max_active``
    open runs, none older than ``max_active_age_s`` (a run never finished is finished early,
    counted as ``evicted``, when a later one starts), the last ``history`` finished ones, and
    ``_MAX_KEYS`` providers and models."""

    def __init__(
        self, max_active: int = 10_000, history: int = 1_000, max_active_age_s: float = 3_600.0
    ) -> None:
        self._active: OrderedDict[str, WorkflowMetrics] = OrderedDict()
        self._finished: deque[WorkflowMetrics] = deque(maxlen=history)
        self._max_active = max_active
        self._max_age_s = max_active_age_s
        self._by_provider: dict[str, _Totals] = {}
        self._by_model: dict[str, _Totals] = {}
        self._ops = {"started": 0, "finished": 0, "failed": 0, "evicted": 0}
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
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
            now = time.time()
            while len(self._active) > self._max_active or (
                now - next(iter(self._active.values())).start_time > self._max_age_s
            ):
                _, old = self._active.popitem(last=False)
                old.end_time = now
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
                if metrics.input_tokens is None and metrics.output_tokens is None:
                    t.calls_without_usage += 1
                if metrics.usage_estimated:
                    t.calls_estimated += 1
                t.input_tokens += metrics.input_tokens or 0
                t.output_tokens += metrics.output_tokens or 0
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


class MonitoringSpanProcessor(RecordSpanProcessor):
    """Records of our spans -> calls into ``service`` (any object with the monitoring API),
    off-thread, in order."""

    def __init__(
        self, service: Any, worker: SinkWorker | None = None, *,
        llm_metrics: Any = None, timestamps: str = "datetime", workflows: bool = True,
    ) -> None:  # fmt: skip
        self.service = service
        # False in fill mode (sinks/fill.py): a run the app tracks itself gets no entry of ours
        # beside it (its own is filled), only its LLM calls; other runs get ours as usual.
        self.workflows = workflows
        self._apps: OrderedDict[str, bool] = OrderedDict()  # our workflow ids the app tracks
        self.worker = worker or SinkWorker("monitoring")
        self._types = AppTypes(llm_metrics, timestamps, own=isinstance(service, MonitoringService))
        # our workflow id -> the service's; only the worker thread touches it. Bounded: a run
        # whose finish never came is forgotten once _MAX_OPEN newer ones started.
        self._ids: OrderedDict[str, Any] = OrderedDict()

    def workflow_started(self, start: WorkflowStart, span_id: str, trace_id: str) -> None:
        if start.outermost and not self.workflows and app_tracking.get() is not None:
            self._apps[span_id] = True  # the app tracks this run itself: it is filled, not doubled
            while len(self._apps) > _MAX_OPEN:
                self._apps.popitem(last=False)
            return
        if start.outermost:
            ids = start.ids
            self.worker.call(
                self._start, span_id, ids.user_id or "", ids.conversation_id or "",
                ids.correlation_id or "", {"workflow_name": start.name},
            )  # fmt: skip

    def ended(self, record: Record) -> None:
        workflow_id = record.workflow_id
        if workflow_id is None:
            return
        call = self.worker.call
        if workflow_id in self._apps:  # the app's own record is filled (sinks/fill.py)
            if isinstance(record, LLMCallRecord):
                call(self.service.record_llm_operation, self._llm_metrics(record))
            elif isinstance(record, WorkflowRecord) and record.outermost:
                self._apps.pop(workflow_id, None)
            return
        if isinstance(record, LLMCallRecord):
            provider = record.provider or "unknown"
            call(self.service.record_llm_operation, self._llm_metrics(record))
            if record.total_tokens is not None:
                usage = {provider: record.total_tokens}
                call(self._call, workflow_id, "update_workflow_metrics", token_usage=usage)
        elif isinstance(record, ToolCallRecord):
            call(self._call, workflow_id, "update_workflow_metrics", tool_calls=1)
        closes = isinstance(record, WorkflowRecord) and record.outermost
        if record.failed and (closes or isinstance(record, LLMCallRecord | ToolCallRecord)):
            call(self._call, workflow_id, "update_workflow_metrics", error=record.error_type)
        if closes:
            call(self._finish, workflow_id)

    def _llm_metrics(self, record: LLMCallRecord) -> Any:
        return self._types.llm_metrics(
            timestamp=datetime.fromtimestamp(record.end_ns / 1e9, tz=UTC),
            provider=record.provider or "unknown", model=record.model or "",
            operation=record.operation, input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            duration_ms=(record.end_ns - record.start_ns) / 1e6,
            cost_estimate=float(record.cost) if record.cost is not None else None,
            correlation_id=record.ids.correlation_id or "",
            usage_estimated=record.usage_estimated,
        )  # fmt: skip

    def _start(self, ours: str, user: str, conversation: str, correlation: str, cfg: Any) -> None:
        self._ids[ours] = self.service.start_workflow_tracking(
            user, conversation, workflow_config=cfg, correlation_id=correlation
        )
        while len(self._ids) > _MAX_OPEN:
            self._ids.popitem(last=False)

    def _call(self, ours: str, method: str, *args: Any, **kwargs: Any) -> None:
        theirs = self._ids.get(ours)
        if theirs is not None:
            getattr(self.service, method)(theirs, *args, **kwargs)

    def _finish(self, ours: str) -> None:
        theirs = self._ids.pop(ours, None)
        if theirs is not None:
            self.service.finish_workflow_tracking(theirs)

    def repoint(
        self, service: Any = None, llm_metrics: Any = None, timestamps: str = "datetime",
        workflows: bool = True, **_: Any,
    ) -> None:  # fmt: skip
        """Report to ``service`` from now on (a new ``configure`` on the same provider)."""
        if self.worker.stopped:
            self.worker = SinkWorker("monitoring")
        self.service = service
        self.workflows = workflows
        self._types = AppTypes(llm_metrics, timestamps, own=isinstance(service, MonitoringService))

    def detach(self) -> None:
        """Stop reporting (processors cannot be removed from a provider); ends the worker."""
        self.service = _NoService()
        self.worker.stop()

    def shutdown(self) -> None:
        self.worker.flush(2.0)
        self.worker.stop()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.worker.flush(timeout_millis / 1000)


class AppTypes:
    """What the app's own MonitoringService expects, from ``configure``: its LLM metrics class
    (built from the fields it declares; ours when none is given), its timestamp format
    (``"datetime"``, timezone-aware UTC, or ``"epoch"``, float seconds), and numbers it can sum:
    for a service that is not the built-in one, an unknown cost is ``0.0``, never ``None``
    (its totals add floats; our spans and records still say the cost is unknown).

    Tokens a provider did not report are ``None`` wherever the class admits it (its field
    annotated ``int | None``, or ours); a class whose token fields are plain ``int`` gets ``0``
    (it could not be built otherwise), its ``usage_missing`` field, if it has one, set ``True``,
    and one log line saying how to see those calls as missing. Estimated counts
    (``estimate_usage``) go as numbers, with ``usage_estimated=True`` for a class that has that
    field."""

    def __init__(self, cls: Any, timestamps: str, *, own: bool) -> None:
        if timestamps not in ("datetime", "epoch"):
            _log.warning("chatter-otel: monitoring timestamps=%r is not datetime or epoch; "
                         "using datetime", timestamps)  # fmt: skip
            timestamps = "datetime"
        self.cls = cls or LLMMetrics
        self.epoch = timestamps == "epoch"
        self.own = own
        fields = getattr(self.cls, "__dataclass_fields__", None) or getattr(
            self.cls, "model_fields", None
        )
        self.accepts = frozenset(fields) if fields else None
        self.no_none = frozenset(
            k for k in ("input_tokens", "output_tokens") if not _admits_none(self.cls, k)
        )

    def llm_metrics(self, **values: Any) -> Any:
        # An estimate (estimate_usage) is flagged to a class with a field for it.
        if values.pop("usage_estimated", False) and "usage_estimated" in (self.accepts or ()):
            values["usage_estimated"] = True
        if self.epoch:
            values["timestamp"] = values["timestamp"].timestamp()
        if not self.own and values.get("cost_estimate") is None:
            values["cost_estimate"] = 0.0
        missing = [k for k in self.no_none if values.get(k) is None]
        if missing:
            for k in missing:
                values[k] = 0
            if self.accepts is not None and "usage_missing" in self.accepts:
                values["usage_missing"] = True
            warn_once(f"monitoring:no-none:{self.cls.__name__}", "chatter-otel: %s declares "
                      "%s without None, so an LLM call that reported no usage goes to the app's "
                      "record_llm_operation with 0 tokens (its spans say chatter.usage.missing); "
                      "annotate them `int | None` to see such calls as missing",
                      self.cls.__name__, " and ".join(sorted(missing)))  # fmt: skip
        if self.accepts is not None:
            values = {k: v for k, v in values.items() if k in self.accepts}
        return self.cls(**values)


def _admits_none(cls: Any, name: str) -> bool:
    """Whether ``cls`` declares field ``name`` as admitting None (or does not say)."""
    fields = getattr(cls, "model_fields", None)  # pydantic
    if fields is not None and name in fields:
        annotation: Any = fields[name].annotation
    else:
        try:
            annotation = typing.get_type_hints(cls).get(name)
        except Exception:  # unresolvable annotations: read the text
            annotation = getattr(cls, "__annotations__", {}).get(name)
    if annotation is None:
        return name not in getattr(cls, "__annotations__", {}) and not fields
    if isinstance(annotation, str):
        return "None" in annotation or "Optional" in annotation
    return annotation is Any or type(None) in typing.get_args(annotation)


class _NoService:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
