"""Which workflow run a span belongs to, from explicit parent ids, and what every processor
reads off an ended span (model, duration): shared by the processors.

A run's outermost ``invoke_workflow`` span opens a scope; every span whose parent is in the
scope joins it; a span leaves when it ends. Sibling workflows in one trace (two graphs run
concurrently in one request) get scopes of their own. Bounded: the oldest open entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GenAiOperationNameValues,
)
from opentelemetry.trace import format_span_id

_WORKFLOW = GenAiOperationNameValues.INVOKE_WORKFLOW.value
_MAX_OPEN = 50_000


def model_of(attributes: Any) -> Any:
    """The model that answered, else the one asked for."""
    return attributes.get(GEN_AI_RESPONSE_MODEL) or attributes.get(GEN_AI_REQUEST_MODEL)


def duration_ns(span: Any) -> int:
    return (span.end_time or 0) - (span.start_time or 0)


class WorkflowScopes:
    def __init__(self, max_open: int = _MAX_OPEN) -> None:
        self._inside: OrderedDict[int, str] = OrderedDict()
        self._max = max_open
        self._lock = threading.Lock()

    def enter(self, span: Any) -> tuple[str | None, bool]:
        """At span start: (workflow id or None, whether the span opens a run's scope)."""
        parent = span.parent.span_id if span.parent is not None else None
        is_workflow = (span.attributes or {}).get(GEN_AI_OPERATION_NAME) == _WORKFLOW
        with self._lock:
            workflow_id = self._inside.get(parent) if parent is not None else None
            outermost = is_workflow and workflow_id is None
            if outermost:
                workflow_id = format_span_id(span.context.span_id)
            if workflow_id is not None:
                self._inside[span.context.span_id] = workflow_id
                while len(self._inside) > self._max:
                    self._inside.popitem(last=False)
        return workflow_id, outermost

    def leave(self, span: Any) -> tuple[str | None, bool]:
        """At span end: (workflow id or None, whether the span closes its run's scope)."""
        sid = span.context.span_id
        with self._lock:
            workflow_id = self._inside.pop(sid, None)
        return workflow_id, workflow_id is not None and workflow_id == format_span_id(sid)

    def clear(self) -> None:
        with self._lock:
            self._inside.clear()
