"""LangChain callbacks -> OpenTelemetry spans: workflows, nodes, LLM calls and tool calls.

Spans are parented explicitly from LangChain's ``parent_run_id``; runs that get no span of their
own (plain chains, routers, channel writes) alias their nearest ancestor's run, so a chat model
called three runnables deep still lands under its node. The handler runs inline
(``run_inline = True``): no executor hop in async code. Every callback is guarded, so a fault
here is logged and never reaches the app; the app's own exceptions only ever pass through.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langgraph.errors import GraphBubbleUp, GraphInterrupt
from opentelemetry import baggage, trace
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    GEN_AI_TOOL_CALL_ARGUMENTS,
    GEN_AI_TOOL_CALL_ID,
    GEN_AI_TOOL_CALL_RESULT,
    GEN_AI_TOOL_DESCRIPTION,
    GEN_AI_TOOL_NAME,
    GEN_AI_TOOL_TYPE,
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    GEN_AI_WORKFLOW_NAME,
    GenAiOperationNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode

from chatter_otel import _content
from chatter_otel._providers import provider_name
from chatter_otel._registry import Registry
from chatter_otel._runs import EMPTY_IDS, RunIds, RunSlot, WorkflowRun, current_workflow
from chatter_otel._safety import guarded, warn_once
from chatter_otel._usage import extract_response
from chatter_otel.attributes import (
    CHATTER_CANCELLED,
    CHATTER_CORRELATION_ID,
    CHATTER_INTERRUPTED,
    CHATTER_USAGE_MISSING,
    CHATTER_WORKFLOW_ID,
    GEN_AI_USAGE_COST_AMOUNT,
    GEN_AI_USAGE_COST_CURRENCY,
    GEN_AI_USAGE_COST_SOURCE,
    LANGGRAPH_NODE_NAME,
    LANGGRAPH_STEP,
    ORPHANED_ERROR_TYPE,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from chatter_otel._cost import Pricer
    from chatter_otel._settings import Settings

_WORKFLOW, _NODE, _CHAT, _TOOL = 1, 2, 3, 4
_OP_WORKFLOW = GenAiOperationNameValues.INVOKE_WORKFLOW.value
_OP_CHAT = GenAiOperationNameValues.CHAT.value
_OP_TEXT = GenAiOperationNameValues.TEXT_COMPLETION.value
_OP_TOOL = GenAiOperationNameValues.EXECUTE_TOOL.value
_HIDDEN_NODES = frozenset({"__start__"})  # LangGraph's input-writing pseudo node
_MAX_ID_LEN = 256
_MAX_DESC_LEN = 256


@dataclass(slots=True, eq=False)
class _Run:
    run_id: UUID
    kind: int
    span: Span
    ids: RunIds
    workflow: WorkflowRun | None  # WORKFLOW: its own; else the enclosing workflow
    parent: _Run | None
    started_ns: int
    parent_workflow: WorkflowRun | None = None  # WORKFLOW only: where its totals roll up
    node: _Run | None = None  # WORKFLOW only: the node span of a subgraph added as a node
    slot: RunSlot | None = None  # WORKFLOW only: where last_run() finds it, if outermost
    provider: str | None = None
    request_model: str | None = None
    first_chunk_ns: int | None = None
    streaming: bool = False
    error_id: int = 0  # id() of the exception a child already recorded


def clean_id(value: Any) -> str | None:
    if (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, UUID):
        value = str(value)
    if not isinstance(value, str) or not value:
        return None
    if len(value) > _MAX_ID_LEN:
        warn_once("ids:long", "chatter-otel: ignoring an id over %d chars", _MAX_ID_LEN)
        return None
    return value


def ids_from_config(config: Mapping[str, Any] | None) -> RunIds:
    """App ids from a LangGraph config: ``metadata`` first, then ``configurable``.

    ``conversation_id`` falls back to LangGraph's ``thread_id``.
    """
    if not config:
        return EMPTY_IDS
    md = config.get("metadata") or {}
    conf = config.get("configurable") or {}

    def pick(*keys: str) -> str | None:
        for source in (md, conf):
            for key in keys:
                if (value := clean_id(source.get(key))) is not None:
                    return value
        return None

    ids = RunIds(
        conversation_id=pick("conversation_id", "thread_id"),
        message_id=pick("message_id"),
        user_id=pick("user_id"),
        correlation_id=pick("correlation_id"),
    )
    return (
        ids
        if any((ids.conversation_id, ids.message_id, ids.user_id, ids.correlation_id))
        else (EMPTY_IDS)
    )


def error_type(error: BaseException) -> str:
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def is_cancel(error: BaseException) -> bool:
    return isinstance(error, asyncio.CancelledError | GeneratorExit)


class OtelCallbackHandler(BaseCallbackHandler):
    """The one LangChain callback handler that records spans for every run."""

    run_inline = True  # called in the caller's thread or task: no executor hop
    raise_error = False
    # ignore_agent stays False: LangChain gates on_tool_start/end/error on it too.
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, tracer: Tracer, settings: Settings, pricer: Pricer) -> None:
        super().__init__()
        self.tracer = tracer
        self.settings = settings
        self.pricer = pricer
        self.enabled = True
        self._runs: Registry[_Run] = Registry(
            settings.max_runs, settings.max_run_age_s, self._evict
        )
        # Graph runs announced by the Pregel.stream/astream wrapper, by run id.
        self._graphs: OrderedDict[UUID, tuple[str, RunIds, RunSlot]] = OrderedDict()

    # -- announced by the instrumentor ---------------------------------------------------------

    def expect_graph(self, run_id: UUID, name: str, ids: RunIds, slot: RunSlot) -> None:
        graphs = self._graphs
        graphs[run_id] = (name, ids, slot)
        while len(graphs) > self.settings.max_runs:
            graphs.popitem(last=False)

    def context_for(self, config: Mapping[str, Any] | None) -> Context | None:
        """The context making the running node's span current, or None to leave it alone."""
        if not config:
            return None
        parent_id = getattr(config.get("callbacks"), "parent_run_id", None)
        run = self._runs.get(parent_id)
        if run is None or run.kind == _CHAT:
            return None
        span = run.node.span if run.node is not None else run.span
        if trace.get_current_span() is span:
            return None
        return trace.set_span_in_context(span)

    # -- span helpers ---------------------------------------------------------------------------

    def _start(self, name: str, kind: SpanKind, parent: _Run | None, attrs: dict[str, Any]) -> Span:
        # Attributes known at the start go in at the start: samplers and span processors'
        # on_start (the event processor) see them.
        ctx = trace.set_span_in_context(parent.span) if parent is not None else None
        return self.tracer.start_span(name, context=ctx, kind=kind, attributes=attrs)

    def _outcome(self, run: _Run, error: BaseException | None) -> str:
        """Set status from the error (if any); returns ok, error, interrupted or cancelled."""
        if error is None:
            return "ok"
        span = run.span
        if isinstance(error, GraphBubbleUp):
            # LangGraph control flow (interrupt, Command to parent, drain) is not a failure.
            if isinstance(error, GraphInterrupt):
                span.set_attribute(CHATTER_INTERRUPTED, True)
                return "interrupted"
            return "ok"
        if is_cancel(error):
            span.set_attribute(CHATTER_CANCELLED, True)
            return "cancelled"
        etype = error_type(error)
        span.set_attribute(ERROR_TYPE, etype)
        span.set_status(Status(StatusCode.ERROR, f"{etype}: {error}"[:_MAX_DESC_LEN]))
        # One stack trace per exception: where it surfaced first, not on every ancestor.
        if run.error_id != id(error):
            span.record_exception(error)
        if run.parent is not None:
            run.parent.error_id = id(error)
        return "error"

    def _evict(self, run_id: UUID, run: _Run) -> None:
        if run.run_id != run_id:  # an alias entry; its owner is evicted on its own
            return
        warn_once(
            "registry:evict",
            "chatter-otel: ending a run that never finished (registry size/age cap)",
        )
        for span in (run.span, run.node.span if run.node else None):
            if span is None:
                continue
            span.set_attribute(ERROR_TYPE, ORPHANED_ERROR_TYPE)
            span.set_status(Status(StatusCode.ERROR, "run never finished"))
            span.end()

    def close_all(self) -> None:
        """End every open span (at uninstrument), as orphaned."""
        for run_id, run in self._runs.drain():
            self._evict(run_id, run)

    # -- chains: graphs and nodes ---------------------------------------------------------------

    @guarded
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        graph = self._graphs.pop(run_id, None) if self._graphs else None
        if not self.enabled:
            return
        parent = self._runs.get(parent_run_id)
        is_node = (
            parent is not None
            and parent.kind == _WORKFLOW
            and parent.run_id == parent_run_id
            and metadata is not None
            and "langgraph_node" in metadata
        )
        if graph is None:
            if is_node:
                name = kwargs.get("name") or str(metadata["langgraph_node"])  # type: ignore[index]
                if name not in _HIDDEN_NODES:
                    self._runs.put(run_id, self._node_run(run_id, name, parent, metadata))  # type: ignore[arg-type]
                    return
            if parent is not None:
                self._runs.put(run_id, parent)  # alias: no span of its own
            return
        name, ids, slot = graph
        node = None
        if is_node:  # a compiled subgraph added as a node: node span, then workflow span
            node = self._node_run(run_id, kwargs.get("name") or name, parent, metadata)  # type: ignore[arg-type]
        run = self._workflow_run(run_id, name, ids, node or parent, node)
        run.slot = slot
        self._runs.put(run_id, run)

    def _node_run(self, run_id: UUID, name: str, parent: _Run, metadata: Mapping[str, Any]) -> _Run:
        attrs = {LANGGRAPH_NODE_NAME: name, **parent.ids.attributes()}
        step = metadata.get("langgraph_step")
        if isinstance(step, int):
            attrs[LANGGRAPH_STEP] = step
        span = self._start(f"invoke_node {name}", SpanKind.INTERNAL, parent, attrs)
        return _Run(run_id, _NODE, span, parent.ids, parent.workflow, parent, time.monotonic_ns())

    def _workflow_run(
        self, run_id: UUID, name: str, ids: RunIds, parent: _Run | None, node: _Run | None
    ) -> _Run:
        if parent is not None:
            parent_wf = parent.workflow
            ids = ids.merged_over(parent.ids)
        else:
            parent_wf = current_workflow.get()
            ids = ids.merged_over(parent_wf.ids if parent_wf is not None else None)
            if ids.correlation_id is None:
                corr = clean_id(baggage.get_baggage(CHATTER_CORRELATION_ID))
                if corr is not None:
                    ids = RunIds(ids.conversation_id, ids.message_id, ids.user_id, corr)
        wf = WorkflowRun(name=name, ids=ids)
        attrs = {GEN_AI_OPERATION_NAME: _OP_WORKFLOW, GEN_AI_WORKFLOW_NAME: name}
        attrs.update(ids.attributes())
        span = self._start(f"invoke_workflow {name}", SpanKind.INTERNAL, parent, attrs)
        wf.bind_span(span)
        if parent_wf is None and wf.workflow_id and span.is_recording():
            span.set_attribute(CHATTER_WORKFLOW_ID, wf.workflow_id)
        return _Run(
            run_id, _WORKFLOW, span, ids, wf, parent, time.monotonic_ns(),
            parent_workflow=parent_wf, node=node,
        )  # fmt: skip

    @guarded
    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_chain(run_id, None)

    @guarded
    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_chain(run_id, error)

    def _end_chain(self, run_id: UUID, error: BaseException | None) -> None:
        run = self._runs.pop(run_id)
        if run is None or run.run_id != run_id:
            return  # unknown, or an alias of its ancestor's run
        status = self._outcome(run, error)
        if run.kind == _WORKFLOW:
            self._end_workflow(run, status, error)
        else:
            run.span.end()

    def _end_workflow(self, run: _Run, status: str, error: BaseException | None) -> None:
        wf = run.workflow
        assert wf is not None
        wf.usage.response_time_ms = (time.monotonic_ns() - run.started_ns) // 1_000_000
        wf.finished_at = time.time()
        wf.status = status
        if status == "error" and error is not None:
            wf.error_type = error_type(error)
        if run.span.is_recording():
            run.span.set_attributes(wf.rollup_attributes())
        run.span.end()
        if run.node is not None:
            self._outcome(run.node, error)
            run.node.span.end()
        if run.parent_workflow is not None:
            run.parent_workflow.merge_child(wf)
        elif run.slot is not None:
            run.slot.run = wf

    # -- LLM calls ------------------------------------------------------------------------------

    @guarded
    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.enabled:
            self._start_llm(
                operation=_OP_CHAT, serialized=serialized, inputs=messages, run_id=run_id,
                parent_run_id=parent_run_id, metadata=metadata, kwargs=kwargs,
            )  # fmt: skip

    @guarded
    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.enabled:
            self._start_llm(
                operation=_OP_TEXT, serialized=serialized, inputs=prompts, run_id=run_id,
                parent_run_id=parent_run_id, metadata=metadata, kwargs=kwargs,
            )  # fmt: skip

    def _start_llm(
        self,
        *,
        operation: str,
        serialized: Mapping[str, Any] | None,
        inputs: list[Any],
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        parent = self._runs.get(parent_run_id)
        md = metadata or {}
        params = kwargs.get("invocation_params") or {}
        class_name = None
        if serialized and isinstance(serialized.get("id"), list) and serialized["id"]:
            class_name = str(serialized["id"][-1])
        provider = provider_name(md.get("ls_provider"), class_name or params.get("_type"))
        model = (
            params.get("model") or params.get("model_name") or params.get("model_id")
            or md.get("ls_model_name")
        )  # fmt: skip
        model = model if isinstance(model, str) and model else None
        ids = parent.ids if parent is not None else self._ambient_ids(md)
        streaming = bool(params.get("stream") or params.get("streaming"))
        span = self._start(
            f"{operation} {model}" if model else operation, SpanKind.CLIENT, parent, {}
        )
        if span.is_recording():
            attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: operation, **ids.attributes()}
            if provider:
                attrs[GEN_AI_PROVIDER_NAME] = provider
            if model:
                attrs[GEN_AI_REQUEST_MODEL] = model
            temperature, max_tokens = md.get("ls_temperature"), md.get("ls_max_tokens")
            if isinstance(temperature, int | float) and not isinstance(temperature, bool):
                attrs[GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
            if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
                attrs[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
            if self.settings.capture_content and inputs:
                batch = inputs[0]
                value = (
                    [_content.message_json(m) for m in batch]
                    if isinstance(batch, list)
                    else [{"role": "user", "parts": [{"type": "text", "content": str(batch)}]}]
                )
                attrs[GEN_AI_INPUT_MESSAGES] = _content.render(self.settings, "input", value)
            span.set_attributes(attrs)
        run = _Run(
            run_id, _CHAT, span, ids, parent.workflow if parent else current_workflow.get(),
            parent, time.monotonic_ns(), provider=provider, request_model=model,
            streaming=streaming,
        )  # fmt: skip
        self._runs.put(run_id, run)

    def _ambient_ids(self, metadata: Mapping[str, Any]) -> RunIds:
        """Ids for an LLM or tool call made outside any graph run."""
        scope = current_workflow.get()
        ids = ids_from_config({"metadata": metadata})
        return ids.merged_over(scope.ids if scope is not None else None)

    @guarded
    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.get(run_id)
        if run is not None and run.first_chunk_ns is None:
            run.first_chunk_ns = time.monotonic_ns()
            run.streaming = True

    @guarded
    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_llm(run_id, response, None)

    @guarded
    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, response: Any = None, **kwargs: Any
    ) -> None:
        self._end_llm(run_id, response, error)

    def _end_llm(self, run_id: UUID, response: Any, error: BaseException | None) -> None:
        run = self._runs.pop(run_id)
        if run is None or run.kind != _CHAT:
            return
        info = extract_response(response)
        usage = info.usage
        models = (info.model, run.request_model)
        cost = self.pricer.cost(usage, models, run.provider)
        span = run.span
        if span.is_recording():
            attrs: dict[str, Any] = {GEN_AI_REQUEST_STREAM: run.streaming}
            if info.model:
                attrs[GEN_AI_RESPONSE_MODEL] = info.model
            if info.response_id:
                attrs[GEN_AI_RESPONSE_ID] = info.response_id
            if info.finish_reasons:
                attrs[GEN_AI_RESPONSE_FINISH_REASONS] = info.finish_reasons
            if run.first_chunk_ns is not None:
                attrs[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = (
                    run.first_chunk_ns - run.started_ns
                ) / 1e9
            for key, value in (
                (GEN_AI_USAGE_INPUT_TOKENS, usage.input_tokens),
                (GEN_AI_USAGE_OUTPUT_TOKENS, usage.output_tokens),
                (GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, usage.cache_read_input_tokens),
                (GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, usage.cache_creation_input_tokens),
                (GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, usage.reasoning_output_tokens),
            ):
                if value is not None:
                    attrs[key] = value
            if not usage.reported:
                attrs[CHATTER_USAGE_MISSING] = True
            if cost is not None:
                attrs[GEN_AI_USAGE_COST_AMOUNT] = float(cost.amount)
                attrs[GEN_AI_USAGE_COST_CURRENCY] = cost.currency
                attrs[GEN_AI_USAGE_COST_SOURCE] = cost.source
            if self.settings.capture_content and response is not None:
                out = self._output_messages(response)
                if out:
                    attrs[GEN_AI_OUTPUT_MESSAGES] = _content.render(self.settings, "output", out)
            span.set_attributes(attrs)
        self._outcome(run, error)
        span.end()
        if run.workflow is not None:
            run.workflow.add_llm_call(
                usage,
                cost,
                run.provider,
                info.model or run.request_model,
                info.finish_reasons[-1] if info.finish_reasons else None,
            )

    @staticmethod
    def _output_messages(response: Any) -> list[dict[str, Any]]:
        out = []
        for gen in (getattr(response, "generations", None) or [[]])[0]:
            msg = getattr(gen, "message", None)
            item = (
                _content.message_json(msg)
                if msg is not None
                else {"role": "assistant", "parts": [{"type": "text", "content": gen.text}]}
            )
            reason = (getattr(msg, "response_metadata", None) or {}).get("finish_reason")
            if reason:
                item["finish_reason"] = reason
            out.append(item)
        return out

    # -- tools ----------------------------------------------------------------------------------

    @guarded
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        parent = self._runs.get(parent_run_id)
        ser = serialized or {}
        name = kwargs.get("name") or ser.get("name") or "tool"
        ids = parent.ids if parent is not None else self._ambient_ids(metadata or {})
        span = self._start(f"execute_tool {name}", SpanKind.INTERNAL, parent, {})
        if span.is_recording():
            attrs: dict[str, Any] = {
                GEN_AI_OPERATION_NAME: _OP_TOOL,
                GEN_AI_TOOL_NAME: str(name),
                GEN_AI_TOOL_TYPE: "function",
                **ids.attributes(),
            }
            call_id = kwargs.get("tool_call_id")
            if isinstance(call_id, str) and call_id:
                attrs[GEN_AI_TOOL_CALL_ID] = call_id
            description = ser.get("description")
            if isinstance(description, str) and description:
                attrs[GEN_AI_TOOL_DESCRIPTION] = description[:_MAX_DESC_LEN]
            if self.settings.capture_content:
                args = inputs if inputs is not None else input_str
                attrs[GEN_AI_TOOL_CALL_ARGUMENTS] = _content.render(
                    self.settings, "tool.arguments", args
                )
            span.set_attributes(attrs)
        workflow = parent.workflow if parent is not None else current_workflow.get()
        self._runs.put(
            run_id, _Run(run_id, _TOOL, span, ids, workflow, parent, time.monotonic_ns())
        )

    @guarded
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_tool(run_id, output, None)

    @guarded
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_tool(run_id, None, error)

    def _end_tool(self, run_id: UUID, output: Any, error: BaseException | None) -> None:
        run = self._runs.pop(run_id)
        if run is None or run.kind != _TOOL:
            return
        if error is None and self.settings.capture_content and run.span.is_recording():
            result = getattr(output, "content", output)
            run.span.set_attribute(
                GEN_AI_TOOL_CALL_RESULT, _content.render(self.settings, "tool.result", result)
            )
        self._outcome(run, error)
        run.span.end()
        if run.workflow is not None:
            run.workflow.add_tool_call()

    # -- retrievers: no span yet, but their children keep their place in the tree --------------

    @guarded
    def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        parent = self._runs.get(parent_run_id)
        if parent is not None and self.enabled:
            self._runs.put(run_id, parent)

    @guarded
    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._runs.pop(run_id)

    @guarded
    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._runs.pop(run_id)


_active: OtelCallbackHandler | None = None


def active_handler() -> OtelCallbackHandler | None:
    """The handler of the instrumentor currently installed, if any."""
    return _active


def set_active_handler(handler: OtelCallbackHandler | None) -> None:
    global _active  # noqa: PLW0603 - one process-wide instrumentation, like BaseInstrumentor
    _active = handler
