"""One invocation object per operation: it owns its span and ends it in ``finally``.

A workflow (graph run or ``track_workflow``), a graph node, an LLM call and a tool call each get
an invocation when they start. Ending one runs the steps that can fail (usage, pricing, content,
attributes) each under its own guard, builds the operation's frozen record, and ends the span
with the record in ``finally``: a fault in any step is counted and logged, and never leaves a
span open, a record unsent or a roll-up missing (util-genai's ``_finish`` pattern).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GenAiOperationNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_MESSAGE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from chatter_otel._safety import internal_error, warn_once
from chatter_otel.attributes import (
    CHATTER_CANCELLED,
    CHATTER_INTERRUPTED,
    CHATTER_WORKFLOW_ID,
    LANGGRAPH_CHECKPOINT_ID,
    LANGGRAPH_NODE_NAME,
    LANGGRAPH_STEP,
    LANGGRAPH_THREAD_ID,
    ORPHANED_ERROR_TYPE,
)
from chatter_otel.instrumentation import records as r
from chatter_otel.instrumentation.control import GraphBubbleUp, GraphInterrupt
from chatter_otel.instrumentation.pauses import PAUSED_EVENT, RESUMED_EVENT, Pause, interrupt_ids
from chatter_otel.instrumentation.runs import RunIds, WorkflowRun

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer

    from chatter_otel.instrumentation.agents import Agent
    from chatter_otel.instrumentation.runs import RunSlot
    from chatter_otel.instrumentation.settings import Settings

_OP_WORKFLOW = GenAiOperationNameValues.INVOKE_WORKFLOW.value
_OP_AGENT = GenAiOperationNameValues.INVOKE_AGENT.value
_MAX_DESC_LEN = 256


class Orphaned(Exception):
    """Stands in for the missing end of a run evicted from the registry."""


def exception_text(settings: Settings, error: BaseException) -> str | None:
    """The app's exception message as spans and events may carry it: None while content
    capture is off (it can hold prompt or tool-argument text), else through the redaction hook
    (dropped if the hook fails)."""
    if not settings.capture_exception_text:
        return None
    text = str(error)
    if settings.redact is not None:
        try:
            text = str(settings.redact("exception", text))
        except Exception:
            warn_once("content:redact-exception", "chatter-otel: redaction hook raised on an "
                      "exception message; message dropped", exc_info=True)  # fmt: skip
            return None
    return text


def error_type(error: BaseException) -> str:
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def is_cancel(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError | GeneratorExit)


class Invocation:
    """What every operation has: its span, ids, parent, the workflow it rolls up into."""

    __slots__ = (
        "agent", "checkpoint_id", "error_id", "ids", "parent", "run_id", "settings", "span",
        "span_id", "start_mono_ns", "start_ns", "trace_id", "workflow",
    )  # fmt: skip

    def __init__(
        self, run_id: Any, ids: RunIds, parent: Invocation | None, workflow: WorkflowRun | None,
        settings: Settings,
    ) -> None:  # fmt: skip
        self.run_id = run_id
        self.settings = settings
        self.ids = ids
        self.parent = parent
        self.workflow = workflow  # the workflow this operation rolls up into (its own, for one)
        self.span: Span = _NOT_STARTED
        self.span_id = self.trace_id = ""
        self.start_ns = time.time_ns()
        self.start_mono_ns = time.monotonic_ns()
        self.error_id = 0  # id() of the exception a child already recorded
        # The agent this operation runs in (its own, for an agent), named on the spans below.
        self.agent: Agent | None = parent.agent if parent is not None else None
        self.checkpoint_id: str | None = None  # of a node's task, noted when it is interrupted

    @property
    def workflow_id(self) -> str | None:
        return self.workflow.root_id if self.workflow is not None else None

    def agent_attributes(self) -> dict[str, str]:
        """The enclosing agent's attributes, for an LLM, tool or retrieval span."""
        agent = self.agent
        return agent.child_attributes(self.settings.semconv) if agent is not None else {}

    def _open(  # noqa: PLR0917 - internal, positional at every call site
        self, tracer: Tracer, name: str, kind: SpanKind, attrs: dict[str, Any],
        context: Context | None = None, links: list[Any] | None = None,
    ) -> None:  # fmt: skip
        # Attributes known at the start go in at the start: samplers and on_start see them.
        if context is None and self.parent is not None:
            context = set_span_in_context(self.parent.span)
        self.span = tracer.start_span(
            name, context=context, kind=kind, attributes=attrs, links=links,
            start_time=self.start_ns,
        )  # fmt: skip
        ctx = self.span.get_span_context()
        self.span_id, self.trace_id = format(ctx.span_id, "016x"), format(ctx.trace_id, "032x")

    def outcome(self, error: BaseException | None) -> tuple[str, str | None, str | None]:
        """Status, error type and message of an end; sets the span's status to match."""
        if error is None:
            return r.OK, None, None
        span = self.span
        if isinstance(error, GraphBubbleUp):
            # LangGraph control flow (interrupt, Command to parent, drain) is not a failure.
            if isinstance(error, GraphInterrupt):
                span.set_attribute(CHATTER_INTERRUPTED, True)
                if self.error_id != id(error):  # not yet told upwards by the run it came from
                    self._interrupt_up(error)
                return r.INTERRUPTED, None, None
            return r.OK, None, None
        if is_cancel(error):
            span.set_attribute(CHATTER_CANCELLED, True)
            return r.CANCELLED, None, None
        if isinstance(error, Orphaned):
            span.set_attribute(ERROR_TYPE, ORPHANED_ERROR_TYPE)
            span.set_status(Status(StatusCode.ERROR, "run never finished"))
            return r.ORPHANED, ORPHANED_ERROR_TYPE, "run never finished"
        etype = error_type(error)
        text = exception_text(self.settings, error)
        message = f"{etype}: {text}"[:_MAX_DESC_LEN] if text is not None else etype
        span.set_attribute(ERROR_TYPE, etype)
        span.set_status(Status(StatusCode.ERROR, message))
        # One exception event per exception: where it surfaced first, not on every ancestor.
        if self.error_id != id(error):
            if text is None:  # the class only: no message, no stack trace (capture is off)
                span.add_event("exception", {EXCEPTION_TYPE: etype})
            elif self.settings.redact is None:
                span.record_exception(error)
            else:  # the redacted message, and no stack trace (it repeats the raw message)
                span.add_event("exception", {EXCEPTION_TYPE: etype, EXCEPTION_MESSAGE: text})
        if self.parent is not None:
            self.parent.error_id = id(error)
        return r.ERROR, etype, message

    def _interrupt_up(self, error: BaseException) -> None:
        """Tell every enclosing workflow that it pauses (the outermost one records the pause),
        once: each ancestor the interrupt then reaches knows it came this way (``error_id``)."""
        ids = interrupt_ids(error)
        checkpoint = self.checkpoint_id
        inv: Invocation | None = self
        while inv is not None:
            if isinstance(inv, WorkflowInvocation):
                inv.note_interrupt(checkpoint, ids)
            checkpoint = checkpoint or inv.checkpoint_id
            inv.error_id = id(error)
            inv = inv.parent

    def _safe_outcome(self, error: BaseException | None) -> tuple[str, str | None, str | None]:
        try:
            return self.outcome(error)
        except Exception:
            internal_error(f"{type(self).__name__}.outcome")
            return (r.OK, None, None) if error is None else (r.ERROR, error_type(error), None)

    def _close(self, record: r.Record | None, end_ns: int) -> None:
        """End the span with its record; never raises (an app's processor may)."""
        try:
            r.end_with(self.span, record, end_ns)
        except Exception:
            internal_error(f"{type(self).__name__}.end")


class _NotStarted:
    """The span of an invocation whose start failed: every call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


_NOT_STARTED: Any = _NotStarted()


class NodeInvocation(Invocation):
    __slots__ = ("name", "step")

    def __init__(
        self, run_id: Any, parent: Invocation, name: str, step: int | None, tracer: Tracer
    ) -> None:
        super().__init__(run_id, parent.ids, parent, parent.workflow, parent.settings)
        self.name, self.step = name, step
        attrs: dict[str, Any] = {LANGGRAPH_NODE_NAME: name, **parent.ids.attributes()}
        if step is not None:
            attrs[LANGGRAPH_STEP] = step
        self._open(tracer, f"invoke_node {name}", SpanKind.INTERNAL, attrs)

    def stop(self, error: BaseException | None) -> None:
        end_ns = time.time_ns()
        record = None
        try:
            status, etype, message = self._safe_outcome(error)
            record = r.NodeRecord(
                self.span_id, self.trace_id, self.workflow_id, self.ids, self.start_ns, end_ns,
                status, etype, message, self.name, self.step,
            )  # fmt: skip
        except Exception:
            internal_error("NodeInvocation.stop")
        finally:
            self._close(record, end_ns)


class WorkflowInvocation(Invocation):
    """A workflow: a compiled graph's run, or ``track_workflow``; an agent's run is one too
    (``invoke_agent`` span: a graph an agent factory built, or a graph or node the app marked).
    Owns a ``WorkflowRun`` (what the app gets back) and rolls it up into the enclosing workflow,
    if any, when it ends."""

    __slots__ = (
        "_resumed", "_stamp", "awaits_link", "graph", "interrupted", "is_agent", "node",
        "outer", "pause", "run", "slot", "thread_id",
    )  # fmt: skip

    def __init__(
        self,
        run_id: Any,
        name: str,
        ids: RunIds,
        tracer: Tracer,
        settings: Settings,
        *,
        parent: Invocation | None = None,
        outer: WorkflowRun | None = None,
        node: NodeInvocation | None = None,
        context: Context | None = None,
        agent: Agent | None = None,
        graph: bool = True,
        extra: dict[str, Any] | None = None,
        thread_id: str | None = None,
        resumes: Pause | None = None,
        awaits_link: bool = False,
    ) -> None:
        run = WorkflowRun(name=agent.name if agent is not None else name, ids=ids)
        super().__init__(run_id, ids, parent, run, settings)
        self.run = run
        self.outer = outer  # the enclosing workflow, where this one's totals roll up
        self.node = node  # the node span of a subgraph added as a node
        self.graph = graph  # a graph run (its child chains are nodes), not a marked node
        self.slot: RunSlot | None = None  # where last_run() finds it, if outermost
        self.thread_id = thread_id
        self.is_agent = agent is not None
        # (checkpoint id, interrupt ids) once something inside it was interrupted
        self.interrupted: tuple[str | None, tuple[str, ...]] | None = None
        self.pause: Pause | None = None  # what its end recorded, for the resume to link to
        # A resume whose pause this process did not see: linked from its checkpoint, if any
        # (checkpoint_links.py).
        self.awaits_link = awaits_link
        self._resumed = resumes is not None  # the resumed event and attributes are on it
        self._stamp: str | None = None
        attrs: dict[str, Any]
        if agent is not None:
            self.agent = agent
            attrs = {GEN_AI_OPERATION_NAME: _OP_AGENT, **agent.attributes(settings.semconv)}
        else:
            attrs = {GEN_AI_OPERATION_NAME: _OP_WORKFLOW}
            attrs.update(dict.fromkeys(settings.semconv.workflow_name_keys, name))
        span_name = r.workflow_span_name(run.name, agent is not None)
        if extra:
            attrs.update(extra)
        resumed = resumes.attributes() if resumes is not None else None
        if resumed:
            attrs.update(resumed)
        attrs.update(ids.attributes())
        start = r.WorkflowStart(run.name, outer is None, ids, self.is_agent)
        links = [resumes.link()] if resumes is not None and resumes.context.is_valid else None
        with r.carry_start(start):
            self._open(tracer, span_name, SpanKind.INTERNAL, attrs, context, links)
        if resumed:
            self.span.add_event(RESUMED_EVENT, resumed, timestamp=self.start_ns)
        if self.span_id and self.span.get_span_context().is_valid:
            run.trace_id, run.workflow_id = self.trace_id, self.span_id
        run.root_id = outer.root_id if outer is not None else run.workflow_id
        if outer is None and run.workflow_id:
            self.span.set_attribute(CHATTER_WORKFLOW_ID, run.workflow_id)

    @property
    def stamp(self) -> str:
        """This run's span as a traceparent, for the checkpoints it writes (made once)."""
        if self._stamp is None:
            from chatter_otel.instrumentation.checkpoint_links import traceparent

            self._stamp = traceparent(self.span.get_span_context())
        return self._stamp

    def link_pause(self, paused: SpanContext, checkpoint_id: str | None) -> None:
        """Link to the run that paused in another process (read from the checkpoint this
        run continues from), with the attributes and event an in-process resume gets."""
        self.awaits_link = False
        try:
            attrs: dict[str, Any] = {LANGGRAPH_THREAD_ID: self.thread_id}
            if checkpoint_id is not None:
                attrs[LANGGRAPH_CHECKPOINT_ID] = checkpoint_id
            self.span.add_link(paused, attrs)
            self.span.set_attributes(attrs)
            if not self._resumed:
                self.span.add_event(RESUMED_EVENT, attrs)
        except Exception:
            internal_error("WorkflowInvocation.link_pause")

    def note_interrupt(self, checkpoint_id: str | None, ids: tuple[str, ...]) -> None:
        prev = self.interrupted
        if prev is not None:
            checkpoint_id = prev[0] or checkpoint_id
            ids = prev[1] + tuple(i for i in ids if i not in prev[1])
        self.interrupted = (checkpoint_id, ids)

    def _paused(self, status: str, end_ns: int) -> str:
        """A run something inside it interrupted ends ``interrupted``; the outermost one
        records the pause (event, and the registry entry the resume links to)."""
        assert self.interrupted is not None
        self.span.set_attribute(CHATTER_INTERRUPTED, True)
        if self.thread_id is not None:  # the app's own graph call (set only there)
            checkpoint, ids = self.interrupted
            pause = Pause(self.span.get_span_context(), self.thread_id, checkpoint, ids,
                          time.monotonic())  # fmt: skip
            # On the span too: a backend's search (TraceQL, Jaeger tags) finds both runs by it.
            self.span.set_attributes(pause.attributes())
            self.span.add_event(PAUSED_EVENT, pause.attributes(), timestamp=end_ns)
            self.pause = pause
        return r.INTERRUPTED if status == r.OK else status

    def stop(self, error: BaseException | None) -> WorkflowRun:
        end_ns = time.time_ns()
        run = self.run
        record = None
        try:
            status, etype, message = self._safe_outcome(error)
            if self.interrupted is not None:
                status = self._paused(status, end_ns)
            u = run.usage
            u.response_time_ms = (time.monotonic_ns() - self.start_mono_ns) // 1_000_000
            run.finished_at = time.time()
            run.status = status if status != r.ORPHANED else r.ERROR
            run.error_type = etype
            record = r.WorkflowRecord(
                self.span_id, self.trace_id, self.workflow_id, self.ids, self.start_ns, end_ns,
                status, etype, message, run.name, self.outer is None, u.prompt_tokens,
                u.completion_tokens, u.total_tokens, u.cost, u.cost_currency, u.provider,
                u.model, u.llm_calls, u.tool_calls, self.is_agent,
            )  # fmt: skip
            run.record = record
            try:
                if self.span.is_recording():
                    self.span.set_attributes(run.rollup_attributes())
            except Exception:
                internal_error("WorkflowInvocation.attributes")
        except Exception:
            internal_error("WorkflowInvocation.stop")
        finally:
            self._close(record, end_ns)
            if self.node is not None:
                self.node.stop(error)
            if self.outer is not None:
                self.outer.merge_child(run)
            elif self.slot is not None:
                self.slot.run = run
        return run
