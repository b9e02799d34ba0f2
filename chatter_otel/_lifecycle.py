"""Which workflow run a span belongs to, from explicit parent ids: shared by the processors.

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
    GenAiOperationNameValues,
)

_WORKFLOW = GenAiOperationNameValues.INVOKE_WORKFLOW.value
_MAX_OPEN = 50_000


def span_hex(span_id: int) -> str:
    return format(span_id, "016x")


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
                workflow_id = span_hex(span.context.span_id)
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
        return workflow_id, workflow_id is not None and workflow_id == span_hex(sid)

    def clear(self) -> None:
        with self._lock:
            self._inside.clear()
