"""``track_workflow``: the app's own name and ids for everything run inside, and its usage back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opentelemetry import context, trace

from chatter_otel._safety import internal_error
from chatter_otel.correlation import valid_correlation_id
from chatter_otel.instrumentation.active import active_handler
from chatter_otel.instrumentation.ids import ambient_ids, clean_id
from chatter_otel.instrumentation.invocations import WorkflowInvocation
from chatter_otel.instrumentation.runs import RunIds, WorkflowRun, current_workflow, set_last_run
from chatter_otel.instrumentation.sampling import always_record
from chatter_otel.instrumentation.settings import Settings
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

__all__ = ["track_workflow"]

_DEFAULT_NAME = "workflow"
_DEFAULT_SETTINGS = Settings()  # no instrumentor: content and exception text off


class track_workflow:
    """Group everything run inside into one workflow and hand its usage back.

    Sync and async context manager::

        async with track_workflow("chat", conversation_id=cid, user_id=uid) as run:
            result = await graph.ainvoke(state, config)
        run.usage.total_tokens, run.usage.cost, run.trace_id

    It starts an ``invoke_workflow {name}`` span (the parent of every graph run inside, whose
    totals roll up into it) and makes the ids known to every span inside. It is the same
    workflow invocation a graph run gets: one lifecycle, one record. On exit ``run.usage`` is
    final, ``run.status`` is ``ok``, ``error``, ``interrupted`` or ``cancelled``, and
    ``last_run()`` returns the run. Exceptions pass through unchanged.
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
            valid_correlation_id(clean_id(correlation_id), "track_workflow"),
        )
        self._name = name or _DEFAULT_NAME
        # Over the enclosing run's ids, and the request's correlation id from baggage: the
        # records carry every id the spans do.
        self._ids = ambient_ids(ids)
        self._outer = outer
        # Usable even if starting the span fails: the app always gets a run back.
        self.run = WorkflowRun(name=self._name, ids=self._ids)
        self._inv: WorkflowInvocation | None = None
        self._ctx_token: object | None = None
        self._wf_token: Token[WorkflowRun | None] | None = None

    def _start(self) -> None:
        try:
            handler = active_handler()
            if handler is not None:
                tracer, settings = handler.tracer, handler.settings
            else:
                tracer = always_record(
                    trace.get_tracer("chatter_otel", __version__, schema_url=SCHEMA_URL)
                )
                settings = _DEFAULT_SETTINGS
            inv = WorkflowInvocation(
                None, self._name, self._ids, tracer, settings, outer=self._outer
            )
            self._inv, self.run = inv, inv.run
            self._ctx_token = context.attach(trace.set_span_in_context(inv.span))
        except Exception:
            internal_error("track_workflow.start")

    def _finish(self, exc: BaseException | None) -> None:
        if self._ctx_token is not None:
            try:
                context.detach(self._ctx_token)  # type: ignore[arg-type]
            except Exception:
                internal_error("track_workflow.detach")
        inv = self._inv
        if inv is not None:
            inv.stop(exc)  # never raises; rolls up into the outer run if there is one
        if self._outer is None:
            set_last_run(self.run)

    def __enter__(self) -> WorkflowRun:
        self._start()
        self._wf_token = current_workflow.set(self.run)
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
