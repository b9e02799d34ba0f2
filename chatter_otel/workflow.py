"""``track_workflow``: the app's own name and ids for everything run inside, and its usage back."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import context, trace
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_WORKFLOW_NAME,
    GenAiOperationNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode

from chatter_otel._handler import active_handler, clean_id, error_type, is_cancel
from chatter_otel._runs import RunIds, WorkflowRun, current_workflow, set_last_run
from chatter_otel._safety import guarded
from chatter_otel.attributes import CHATTER_CANCELLED, CHATTER_WORKFLOW_ID
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from opentelemetry.trace import Span

__all__ = ["track_workflow"]

_DEFAULT_NAME = "workflow"


class track_workflow:
    """Group everything run inside into one workflow and hand its usage back.

    Sync and async context manager::

        async with track_workflow("chat", conversation_id=cid, user_id=uid) as run:
            result = await graph.ainvoke(state, config)
        run.usage.total_tokens, run.usage.cost, run.trace_id

    It starts an ``invoke_workflow {name}`` span (the parent of every graph run inside, whose
    totals roll up into it) and makes the ids known to every span inside. On exit ``run.usage``
    is final, ``run.status`` is ``ok``, ``error`` or ``cancelled``, and ``last_run()`` returns
    the run. Exceptions pass through unchanged.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        conversation_id: str | None = None,
        message_id: str | None = None,
        user_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        outer = current_workflow.get()
        ids = RunIds(
            clean_id(conversation_id),
            clean_id(message_id),
            clean_id(user_id),
            clean_id(correlation_id),
        )
        self.run = WorkflowRun(
            name=name or _DEFAULT_NAME, ids=ids.merged_over(outer.ids if outer else None)
        )
        self._outer = outer
        self._span: Span | None = None
        self._ctx_token: object | None = None
        self._wf_token: Token[WorkflowRun | None] | None = None
        self._started_ns = 0

    @guarded
    def _start(self) -> None:
        handler = active_handler()
        tracer = (
            handler.tracer
            if handler is not None
            else trace.get_tracer("chatter_otel", __version__, schema_url=SCHEMA_URL)
        )
        run = self.run
        attrs = {
            GEN_AI_OPERATION_NAME: GenAiOperationNameValues.INVOKE_WORKFLOW.value,
            GEN_AI_WORKFLOW_NAME: run.name,
            **run.ids.attributes(),
        }
        span = tracer.start_span(
            f"invoke_workflow {run.name}", kind=SpanKind.INTERNAL, attributes=attrs
        )
        run.bind_span(span)
        if self._outer is None and run.workflow_id and span.is_recording():
            span.set_attribute(CHATTER_WORKFLOW_ID, run.workflow_id)
        self._span = span
        self._started_ns = time.monotonic_ns()
        self._ctx_token = context.attach(trace.set_span_in_context(span))

    @guarded
    def _finish(self, exc: BaseException | None) -> None:
        run = self.run
        run.usage.response_time_ms = (time.monotonic_ns() - self._started_ns) // 1_000_000
        run.finished_at = time.time()
        span = self._span
        if exc is None:
            run.status = "ok"
        elif is_cancel(exc):
            run.status = "cancelled"
        else:
            run.status = "error"
            run.error_type = error_type(exc)
        if span is not None:
            if span.is_recording():
                span.set_attributes(run.rollup_attributes())
                if run.status == "cancelled":
                    span.set_attribute(CHATTER_CANCELLED, True)
                elif run.status == "error" and exc is not None:
                    span.set_attribute(ERROR_TYPE, run.error_type or "")
                    span.set_status(Status(StatusCode.ERROR, f"{run.error_type}: {exc}"[:256]))
                    span.record_exception(exc)
            span.end()
        if self._ctx_token is not None:
            context.detach(self._ctx_token)  # type: ignore[arg-type]
        if self._outer is not None:
            self._outer.merge_child(run)
        else:
            set_last_run(run)

    def __enter__(self) -> WorkflowRun:
        self._wf_token = current_workflow.set(self.run)
        self._start()
        return self.run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._wf_token is not None:
            current_workflow.reset(self._wf_token)
        self._finish(exc)
        # Returning None: the app's exception, if any, propagates unchanged.

    async def __aenter__(self) -> WorkflowRun:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
