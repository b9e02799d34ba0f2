"""Fill, don't duplicate: where the app records a workflow itself with empty usage, the run's real
usage and correlation id fill the app's own record.

A host app often keeps its own tracker: it calls its MonitoringService's ``start_workflow_tracking``
/ ``update_workflow_metrics(token_usage={'unknown': 0})`` / ``finish_workflow_tracking`` and emits
its own ``workflow_started`` / ``workflow_completed`` with 0 tokens. With
``configure(monitoring=service)`` (mode ``"fill"``, the default for an app's service) the service's
methods on that instance are wrapped: a start without a correlation id gets the request's; an update
or finish with zero usage, right after a run finished in the same context (``last_run()``, the way a
message row is found), gets that run's tokens and tool calls, once per workflow. The package then
records no parallel workflow of its own (each LLM call still goes to ``record_llm_operation``).
Likewise an ``EventOptions.forward_to`` that is a bound method: the app's own workflow events with
zero tokens are filled, and ours for the same runs are not forwarded.
``MonitoringOptions(mode="parallel")`` keeps both, side by side.

Fill, never add: where the app reported usage itself (non-zero tokens in an update, a token or
cost field of its workflow event), nothing of ours is added to it. Its numbers are compared with
the measured ones when the workflow finishes (the app may report call by call): a difference
counts ``chatter.usage.app_mismatch`` (by field and source) and is said in one log line per
kind; ``MonitoringOptions(correct_app_usage=True)`` writes the measured numbers over the app's
(on a service whose updates add up, by one more update of the difference).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from chatter_otel._safety import internal_error, warn_once
from chatter_otel.attributes import APP_MISMATCH_METRIC, CHATTER_USAGE_FIELD, CHATTER_USAGE_SOURCE
from chatter_otel.correlation import current_correlation_id
from chatter_otel.instrumentation.runs import last_run
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.runs import WorkflowRun

__all__ = ["AppUsage", "fill_app_events", "fill_app_monitoring"]

# Set (in the app's own context) when the app starts tracking a workflow itself, or emits its
# own workflow_started: the runs started from that context are the app's to record; ours are
# not added beside them. Runs the app does not track still get ours.
app_tracking: ContextVar[Any] = ContextVar("chatter_otel_app_tracking", default=None)

_WINDOW_S = 300.0
_MAX_FILLED = 10_000
_WORKFLOW_EVENTS = frozenset({"workflow_started", "workflow_completed", "workflow_failed"})
# The keys under which an app's own workflow event says how many tokens a run used, and what it
# cost (the first one present is the app's number).
_TOTAL_KEYS = ("total_tokens", "tokens_used", "tokens")
_TOKEN_KEYS = (*_TOTAL_KEYS, "prompt_tokens", "completion_tokens", "input_tokens",
               "output_tokens")  # fmt: skip
_COST_KEYS = ("cost", "total_cost", "cost_usd")


class AppUsage:
    """The app's own usage numbers against the measured ones: a difference is counted
    (``chatter.usage.app_mismatch``) and said once per source and field; ``correct`` is
    ``MonitoringOptions.correct_app_usage``."""

    def __init__(self, meter_provider: MeterProvider | None, *, correct: bool = False) -> None:
        meter = our_meter(meter_provider)
        self._mismatch = meter.create_counter(
            APP_MISMATCH_METRIC, unit="{run}",
            description="Runs whose usage the app reported with other numbers than measured.",
        )  # fmt: skip
        self.correct = correct

    def differs(self, source: str, field: str, theirs: float, run: WorkflowRun) -> bool:
        """True (counted, logged once per kind) when the app's ``theirs`` is not the run's."""
        ours = run.usage.total_tokens if field == "total_tokens" else run.usage.cost
        if ours is None or math.isclose(float(theirs), float(ours), rel_tol=1e-9, abs_tol=1e-12):
            return False
        self._mismatch.add(1, {CHATTER_USAGE_FIELD: field, CHATTER_USAGE_SOURCE: source})
        warn_once(f"app-usage:{source}:{field}", "chatter-otel: the app's own %s reported "
                  "%s=%s for a run whose LLM calls measured %s (correlation id %s); counted in "
                  "%s, said once. %s", "MonitoringService" if source == "monitoring" else
                  "workflow event", field, theirs, ours, run.correlation_id or "-",
                  APP_MISMATCH_METRIC, "The measured numbers were written over the app's."
                  if self.correct else "MonitoringOptions(correct_app_usage=True) writes the "
                  "measured numbers over the app's.")  # fmt: skip
        return True


def _number(value: Any) -> float | None:
    """A usage number the app reported (bools and zeros are not reports)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value:
        return None
    return float(value)


def _run_here() -> WorkflowRun | None:
    """The run that just finished in this context, if it is recent."""
    run = last_run()
    if run is None or run.finished_at is None or time.time() - run.finished_at > _WINDOW_S:
        return None
    return run


def _empty_usage(usage: Any) -> bool:
    if not usage:
        return True
    return isinstance(usage, dict) and not any(v for v in usage.values())


class _Tracker:
    """The wrapped tracker methods of one app service, and what they remember (bounded)."""

    def __init__(self, originals: dict[str, Any], check: AppUsage) -> None:
        self.originals = originals
        self.check = check
        self.filled: OrderedDict[Any, int] = OrderedDict()  # app workflow id -> id() of its run
        self.reported: OrderedDict[Any, float] = OrderedDict()  # app workflow id -> its tokens

    def take(self, workflow_id: Any) -> WorkflowRun | None:
        run = _run_here()
        if run is None or run.usage.total_tokens is None or self.filled.get(workflow_id) == id(run):
            return None
        self.filled[workflow_id] = id(run)
        while len(self.filled) > _MAX_FILLED:
            self.filled.popitem(last=False)
        return run

    def start(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) < 6 and not kwargs.get("correlation_id"):
            cid = current_correlation_id()
            if cid:
                kwargs["correlation_id"] = cid
        result = self.originals["start_workflow_tracking"](*args, **kwargs)
        app_tracking.set(result if result is not None else True)
        return result

    def update(self, workflow_id: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            usage = args[0] if args else kwargs.get("token_usage")
            if not _empty_usage(usage) and isinstance(usage, dict):  # the app's own report
                tokens = sum(n for v in usage.values() if (n := _number(v)) is not None)
                self.reported[workflow_id] = self.reported.get(workflow_id, 0.0) + tokens
                while len(self.reported) > _MAX_FILLED:
                    self.reported.popitem(last=False)
            fill = _empty_usage(usage) and workflow_id not in self.reported
            run = self.take(workflow_id) if fill else None
            if run is not None:
                kwargs.pop("token_usage", None)
                args = (_usage_of(run), *args[1:])
                if len(args) < 2 and not kwargs.get("tool_calls"):
                    kwargs["tool_calls"] = run.usage.tool_calls
        except Exception:
            internal_error("fill.update_workflow_metrics")
        return self.originals["update_workflow_metrics"](workflow_id, *args, **kwargs)

    def finish(self, workflow_id: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            update = self.originals.get("update_workflow_metrics")
            theirs = self.reported.pop(workflow_id, None)
            run = self.take(workflow_id)
            if run is not None and update is not None and theirs is None:
                update(workflow_id, token_usage=_usage_of(run), tool_calls=run.usage.tool_calls)
            elif run is not None and theirs is not None:  # the app reported: compare, never add
                wrong = self.check.differs("monitoring", "total_tokens", theirs, run)
                if wrong and self.check.correct and update is not None:
                    delta = int((run.usage.total_tokens or 0) - theirs)
                    update(workflow_id, token_usage={run.usage.provider or "unknown": delta})
        except Exception:
            internal_error("fill.finish_workflow_tracking")
        return self.originals["finish_workflow_tracking"](workflow_id, *args, **kwargs)


def _usage_of(run: WorkflowRun) -> dict[str, int]:
    return {run.usage.provider or "unknown": run.usage.total_tokens or 0}


def fill_app_monitoring(service: Any, check: AppUsage) -> Callable[[], None]:
    """Wrap ``service``'s tracker methods (on the instance); returns how to undo it."""
    names = ("start_workflow_tracking", "update_workflow_metrics", "finish_workflow_tracking")
    originals = {n: getattr(service, n) for n in names if hasattr(service, n)}
    tracker = _Tracker(originals, check)
    wrappers = {"start_workflow_tracking": tracker.start,
                "update_workflow_metrics": tracker.update,
                "finish_workflow_tracking": tracker.finish}  # fmt: skip
    try:
        for name in originals:
            setattr(service, name, wrappers[name])
    except (AttributeError, TypeError):  # a slotted or frozen service: nothing to fill
        for name in originals:
            vars(service).pop(name, None) if hasattr(service, "__dict__") else None
        warn_once("fill:monitoring", "chatter-otel: cannot wrap the app's MonitoringService "
                  "(%s) to fill its records; its runs are recorded beside them instead",
                  type(service).__name__)  # fmt: skip
        return lambda: None

    def undo() -> None:
        for name in originals:
            vars(service).pop(name, None)

    return undo


def _event_type(event: Any) -> str:
    value = getattr(event, "event_type", None) or getattr(event, "type", None)
    if value is None and isinstance(event, dict):
        value = event.get("event_type") or event.get("type")
    return str(getattr(value, "value", value) or "")


def _check_event(data: dict[str, Any], run: WorkflowRun, check: AppUsage) -> None:
    """The app's event reports usage itself: compare (and correct, when asked), add nothing."""
    u = run.usage
    for field, keys, ours in (("total_tokens", _TOTAL_KEYS, u.total_tokens),
                              ("cost", _COST_KEYS, u.cost)):  # fmt: skip
        key = next((k for k in keys if _number(data.get(k)) is not None), None)
        if key is not None and check.differs("events", field, data[key], run) and check.correct:
            data[key] = ours if field == "total_tokens" else float(ours or 0)


def _fill_event(event: Any, check: AppUsage) -> None:
    kind = _event_type(event)
    if kind not in _WORKFLOW_EVENTS:
        return
    if kind == "workflow_started":
        app_tracking.set(app_tracking.get() or True)
    run = _run_here() if _event_type(event) != "workflow_started" else None
    data = getattr(event, "data", None) if not isinstance(event, dict) else event.get("data")
    if (
        run is not None
        and isinstance(data, dict)
        and any(_number(data.get(k)) is not None for k in (*_TOKEN_KEYS, *_COST_KEYS))
    ):
        _check_event(data, run, check)
    elif run is not None and isinstance(data, dict):
        u = run.usage
        for key, value in (("prompt_tokens", u.prompt_tokens),
                           ("completion_tokens", u.completion_tokens),
                           ("total_tokens", u.total_tokens), ("llm_calls", u.llm_calls),
                           ("tool_calls", u.tool_calls)):  # fmt: skip
            if value is not None and not data.get(key):
                data[key] = value
        if u.cost is not None and not data.get("cost"):
            data["cost"] = float(u.cost)
    cid = current_correlation_id()
    if cid and not isinstance(event, dict) and not getattr(event, "correlation_id", "x"):
        with contextlib.suppress(AttributeError, TypeError):  # frozen: the app's choice
            event.correlation_id = cid


def fill_app_events(emit: Any, check: AppUsage) -> Callable[[], None] | None:
    """Wrap a bound ``emit`` on its instance, so the app's own calls through it are filled;
    None when ``emit`` is not a bound method (then nothing of the app's can be filled)."""
    owner, name = getattr(emit, "__self__", None), getattr(emit, "__name__", None)
    if owner is None or name is None or not hasattr(owner, "__dict__"):
        return None
    original = getattr(owner, name)

    def filled(event: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _fill_event(event, check)
        except Exception:
            internal_error("fill.emit")
        return original(event, *args, **kwargs)

    setattr(owner, name, filled)
    return lambda: vars(owner).pop(name, None)
