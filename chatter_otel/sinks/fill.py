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
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from chatter_otel._safety import internal_error, warn_once
from chatter_otel.correlation import current_correlation_id
from chatter_otel.instrumentation.runs import last_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from chatter_otel.instrumentation.runs import WorkflowRun

__all__ = ["fill_app_events", "fill_app_monitoring"]

# Set (in the app's own context) when the app starts tracking a workflow itself, or emits its
# own workflow_started: the runs started from that context are the app's to record; ours are
# not added beside them. Runs the app does not track still get ours.
app_tracking: ContextVar[Any] = ContextVar("chatter_otel_app_tracking", default=None)

_WINDOW_S = 300.0
_MAX_FILLED = 10_000
_WORKFLOW_EVENTS = frozenset({"workflow_started", "workflow_completed", "workflow_failed"})


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


def fill_app_monitoring(service: Any) -> Callable[[], None]:
    """Wrap ``service``'s tracker methods (on the instance); returns how to undo it."""
    filled: OrderedDict[Any, int] = OrderedDict()  # app workflow id -> id() of the run used
    names = ("start_workflow_tracking", "update_workflow_metrics", "finish_workflow_tracking")
    originals = {n: getattr(service, n) for n in names if hasattr(service, n)}

    def take(workflow_id: Any) -> WorkflowRun | None:
        run = _run_here()
        if run is None or run.usage.total_tokens is None or filled.get(workflow_id) == id(run):
            return None
        filled[workflow_id] = id(run)
        while len(filled) > _MAX_FILLED:
            filled.popitem(last=False)
        return run

    def usage_of(run: WorkflowRun) -> dict[str, int]:
        return {run.usage.provider or "unknown": run.usage.total_tokens or 0}

    def start(*args: Any, **kwargs: Any) -> Any:
        if len(args) < 6 and not kwargs.get("correlation_id"):
            cid = current_correlation_id()
            if cid:
                kwargs["correlation_id"] = cid
        result = originals["start_workflow_tracking"](*args, **kwargs)
        app_tracking.set(result if result is not None else True)
        return result

    def update(workflow_id: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            usage = args[0] if args else kwargs.get("token_usage")
            run = take(workflow_id) if _empty_usage(usage) else None
            if run is not None:
                kwargs.pop("token_usage", None)
                args = (usage_of(run), *args[1:])
                if len(args) < 2 and not kwargs.get("tool_calls"):
                    kwargs["tool_calls"] = run.usage.tool_calls
        except Exception:
            internal_error("fill.update_workflow_metrics")
        return originals["update_workflow_metrics"](workflow_id, *args, **kwargs)

    def finish(workflow_id: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            run = take(workflow_id)
            if run is not None and "update_workflow_metrics" in originals:
                originals["update_workflow_metrics"](
                    workflow_id, token_usage=usage_of(run), tool_calls=run.usage.tool_calls
                )
        except Exception:
            internal_error("fill.finish_workflow_tracking")
        return originals["finish_workflow_tracking"](workflow_id, *args, **kwargs)

    wrappers = {"start_workflow_tracking": start, "update_workflow_metrics": update,
                "finish_workflow_tracking": finish}  # fmt: skip
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


def _fill_event(event: Any) -> None:
    kind = _event_type(event)
    if kind not in _WORKFLOW_EVENTS:
        return
    if kind == "workflow_started":
        app_tracking.set(app_tracking.get() or True)
    run = _run_here() if _event_type(event) != "workflow_started" else None
    data = getattr(event, "data", None) if not isinstance(event, dict) else event.get("data")
    if run is not None and isinstance(data, dict):
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


def fill_app_events(emit: Any) -> Callable[[], None] | None:
    """Wrap a bound ``emit`` on its instance, so the app's own calls through it are filled;
    None when ``emit`` is not a bound method (then nothing of the app's can be filled)."""
    owner, name = getattr(emit, "__self__", None), getattr(emit, "__name__", None)
    if owner is None or name is None or not hasattr(owner, "__dict__"):
        return None
    original = getattr(owner, name)

    def filled(event: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _fill_event(event)
        except Exception:
            internal_error("fill.emit")
        return original(event, *args, **kwargs)

    setattr(owner, name, filled)
    return lambda: vars(owner).pop(name, None)
