"""The LangChain callback handler: thin. It maps callbacks to invocations and nothing more.

Spans are parented explicitly from LangChain's ``parent_run_id``; runs that get no span of their
own (plain chains, routers, channel writes, retrievers) alias their nearest ancestor's
invocation, so a chat model called three runnables deep still lands under its node. The handler
runs inline (``run_inline = True``): no executor hop in async code. Every callback is guarded, so
a fault here is counted and logged and never reaches the app; the app's own exceptions only ever
pass through.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackHandler
from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GenAiOperationNameValues,
)

from chatter_otel._safety import guarded, internal_error, warn_once
from chatter_otel.instrumentation.calls import LLMInvocation, ToolInvocation
from chatter_otel.instrumentation.chain_starts import Announced, ChainStarts
from chatter_otel.instrumentation.checkpoint_links import RunningThreads
from chatter_otel.instrumentation.ids import ambient_ids, ids_from_config
from chatter_otel.instrumentation.invocations import (
    Invocation,
    NodeInvocation,
    Orphaned,
    WorkflowInvocation,
)
from chatter_otel.instrumentation.pauses import Pauses, checkpoint_of
from chatter_otel.instrumentation.provider_calls import stream_scope
from chatter_otel.instrumentation.providers import provider_name
from chatter_otel.instrumentation.registry import Registry
from chatter_otel.instrumentation.retrieval import RetrievalInvocation, data_source
from chatter_otel.instrumentation.runs import RunIds, RunSlot, current_workflow

if TYPE_CHECKING:
    from collections.abc import Mapping
    from uuid import UUID

    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer

    from chatter_otel.instrumentation.budgets import BudgetTracker
    from chatter_otel.instrumentation.cost import Pricer
    from chatter_otel.instrumentation.settings import Settings

_OP_CHAT = GenAiOperationNameValues.CHAT.value
_OP_TEXT = GenAiOperationNameValues.TEXT_COMPLETION.value
_HIDDEN_NODES = frozenset({"__start__"})  # LangGraph's input-writing pseudo node
_MAX_ID_LEN = 256


class OtelCallbackHandler(BaseCallbackHandler):
    """The one LangChain callback handler that records spans for every run."""

    run_inline = True  # called in the caller's thread or task: no executor hop
    raise_error = False
    # ignore_agent stays False: LangChain gates on_tool_start/end/error on it too.
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, tracer: Tracer, settings: Settings, pricer: Pricer, *,
                 events: Any = None, budget: BudgetTracker | None = None) -> None:  # fmt: skip
        super().__init__()
        self.tracer = tracer
        self.events = events  # a Logs API logger for content events, when they are on
        self.budget = budget  # the app's limits (BudgetOptions), when it set any
        self.settings = settings
        self.pricer = pricer
        self.enabled = True
        self._runs: Registry[Invocation] = Registry(
            settings.max_runs, settings.max_run_age_s, self._evict
        )
        # Graph runs announced by the Pregel.stream/astream wrapper, by run id.
        self._graphs: OrderedDict[UUID, Announced] = OrderedDict()
        self.pauses = Pauses(settings.max_runs, settings.max_run_age_s)
        self.threads = RunningThreads(settings.max_runs)  # the app's graph runs, by thread
        self._starts = ChainStarts(tracer, settings, self.pauses, self.threads)

    # -- announced by the instrumentor ---------------------------------------------------------

    def expect_graph(
        self, run_id: UUID, name: str, ids: RunIds, slot: RunSlot, prebuilt_agent: bool
    ) -> None:
        graphs = self._graphs
        graphs[run_id] = (name, ids, slot, prebuilt_agent)
        while len(graphs) > self.settings.max_runs:
            graphs.popitem(last=False)

    def context_for(self, config: Mapping[str, Any] | None) -> Context | None:
        """The context making the running node's span current, or None to leave it alone."""
        if not config:
            return None
        parent_id = getattr(config.get("callbacks"), "parent_run_id", None)
        inv = self._runs.get(parent_id)
        if inv is None or isinstance(inv, LLMInvocation):
            return None
        node = inv.node if isinstance(inv, WorkflowInvocation) else None
        span = node.span if node is not None else inv.span
        if trace.get_current_span() is span:
            return None
        return trace.set_span_in_context(span)

    @guarded
    def interrupted(self, config: Mapping[str, Any]) -> None:
        """A node's function raised ``GraphInterrupt``: note the checkpoint its task ran from
        (the pause the resume will link to is keyed by it)."""
        parent_id = getattr(config.get("callbacks"), "parent_run_id", None)
        inv = self._runs.get(parent_id)
        if inv is not None and inv.checkpoint_id is None:
            inv.checkpoint_id = checkpoint_of(config.get("configurable"))

    def budget_error(self, config: Mapping[str, Any] | None) -> BaseException | None:
        """The app's exception for a node about to start in a run over its budget, when the
        app asked for one (``BudgetOptions.raise_error``); None otherwise."""
        if self.budget is None or self.budget.options.raise_error is None or not config:
            return None
        try:
            inv = self._runs.get(getattr(config.get("callbacks"), "parent_run_id", None))
            run = inv.workflow if inv is not None else None
            if run is not None:
                self.budget.raise_for(run.root_id, run.ids.conversation_id)
        except self.budget.options.raise_error as exc:
            return exc
        except Exception:
            internal_error("budget_error")
        return None

    @guarded
    def graph_paused(self, run_id: UUID, checkpoint_id: str | None) -> None:
        """A static breakpoint paused the graph run ``run_id`` at ``checkpoint_id``: it and
        every workflow around it end paused, as after an ``interrupt()``."""
        inv: Invocation | None = self._runs.get(run_id)
        while inv is not None:
            if isinstance(inv, WorkflowInvocation):
                inv.note_interrupt(checkpoint_id, ())
            inv = inv.parent

    def _evict(self, run_id: UUID, inv: Invocation) -> None:
        if inv.run_id != run_id:  # an alias entry; its owner is evicted on its own
            return
        warn_once(
            "registry:evict",
            "chatter-otel: ending a run that never finished (registry size/age cap)",
        )
        self._stop(inv, None, Orphaned())

    def close_all(self) -> None:
        """End every open span (at uninstrument), as orphaned."""
        for run_id, inv in self._runs.drain():
            self._evict(run_id, inv)

    def _stop(self, inv: Invocation, output: Any, error: BaseException | None) -> None:
        if isinstance(inv, LLMInvocation):
            inv.stop(output, error, self.pricer, self.settings)
        elif isinstance(inv, ToolInvocation):
            inv.stop(output, error, self.settings)
        elif isinstance(inv, WorkflowInvocation):
            inv.stop(error)
            if inv.thread_id is not None:
                self.threads.ended(inv)
            if inv.pause is not None:
                self.pauses.paused(inv.pause)
            if self.budget is not None and inv.outer is None:
                self.budget.ended(inv.run.root_id)
        elif isinstance(inv, NodeInvocation):
            inv.stop(error)
        elif isinstance(inv, RetrievalInvocation):
            inv.stop(output, error)

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
        node_name: str | None = None
        if (
            isinstance(parent, WorkflowInvocation)
            and parent.graph
            and parent.run_id == parent_run_id
            and metadata is not None
            and "langgraph_node" in metadata
        ):
            node_name = str(kwargs.get("name") or metadata["langgraph_node"])
        starts = self._starts
        if graph is not None:
            inv: Invocation = starts.graph(run_id, graph, node_name, parent, inputs, metadata)
        elif node_name is not None and node_name not in _HIDDEN_NODES:
            assert parent is not None and metadata is not None
            inv = starts.node(run_id, node_name, parent, metadata)
        elif parent is not None:
            inv = parent  # alias: no span of its own
        else:
            return
        self._runs.put(run_id, inv)

    @guarded
    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, None, None)

    @guarded
    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id, None, error)

    def _end(self, run_id: UUID, output: Any, error: BaseException | None) -> None:
        inv = self._runs.pop(run_id)
        if inv is not None and inv.run_id == run_id:  # not unknown, not an alias
            self._stop(inv, output, error)

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
            self._start_llm(_OP_CHAT, serialized, messages, run_id, parent_run_id, metadata,
                            kwargs)  # fmt: skip

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
            self._start_llm(_OP_TEXT, serialized, prompts, run_id, parent_run_id, metadata,
                            kwargs)  # fmt: skip

    def _start_llm(  # noqa: PLR0917 - one internal call site per callback
        self,
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
        ids = parent.ids if parent is not None else self._ambient(md)
        workflow = parent.workflow if parent is not None else current_workflow.get()
        inv = LLMInvocation(
            run_id, ids, parent, workflow, self.tracer, operation=operation, provider=provider,
            model=model, streaming=bool(params.get("stream") or params.get("streaming")),
            metadata=md, settings=self.settings, inputs=inputs, events=self.events,
            budget=self.budget,
        )  # fmt: skip
        self._runs.put(run_id, inv)
        scope = stream_scope()
        if scope is not None:  # model.stream()/astream(): its provider call follows, in this step
            scope.started(inv)

    def llm_invocation(self, run_id: UUID | None) -> LLMInvocation | None:
        """The open LLM call of ``run_id`` (its provider call is about to run)."""
        inv = self._runs.get(run_id)
        return inv if isinstance(inv, LLMInvocation) else None

    @staticmethod
    def _ambient(metadata: Mapping[str, Any]) -> RunIds:
        """Ids for an LLM or tool call made outside any graph run."""
        return ambient_ids(ids_from_config({"metadata": metadata}))

    @guarded
    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        inv = self._runs.get(run_id)
        if isinstance(inv, LLMInvocation):
            inv.chunk()

    @guarded
    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_llm(run_id, response, None)

    @guarded
    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, response: Any = None, **kwargs: Any
    ) -> None:
        self._end_llm(run_id, response, error)

    def _end_llm(self, run_id: UUID, response: Any, error: BaseException | None) -> None:
        inv = self._runs.pop(run_id)
        if isinstance(inv, LLMInvocation) and inv.run_id == run_id:
            inv.stop(response, error, self.pricer, self.settings)

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
        call_id = kwargs.get("tool_call_id")
        description = ser.get("description")
        inv = ToolInvocation(
            run_id,
            parent.ids if parent is not None else self._ambient(metadata or {}),
            parent,
            parent.workflow if parent is not None else current_workflow.get(),
            self.tracer,
            name=str(kwargs.get("name") or ser.get("name") or "tool"),
            call_id=call_id if isinstance(call_id, str) and call_id else None,
            description=description if isinstance(description, str) and description else None,
            arguments=inputs if inputs is not None else input_str,
            settings=self.settings,
        )
        self._runs.put(run_id, inv)

    @guarded
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_tool(run_id, output, None)

    @guarded
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_tool(run_id, None, error)

    def _end_tool(self, run_id: UUID, output: Any, error: BaseException | None) -> None:
        inv = self._runs.pop(run_id)
        if isinstance(inv, ToolInvocation) and inv.run_id == run_id:
            inv.stop(output, error, self.settings)

    # -- retrievers: `retrieval {data source}` spans ----------------------------------------------

    @guarded
    def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        if not self.enabled:
            return
        parent = self._runs.get(parent_run_id)
        inv = RetrievalInvocation(
            run_id, parent.ids if parent is not None else self._ambient(metadata or {}), parent,
            parent.workflow if parent is not None else current_workflow.get(), self.tracer,
            source=data_source(serialized, kwargs), query=query, settings=self.settings,
        )  # fmt: skip
        self._runs.put(run_id, inv)

    @guarded
    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_retrieval(run_id, documents, None)

    @guarded
    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_retrieval(run_id, None, error)

    def _end_retrieval(self, run_id: UUID, documents: Any, error: BaseException | None) -> None:
        inv = self._runs.pop(run_id)
        if isinstance(inv, RetrievalInvocation) and inv.run_id == run_id:
            inv.stop(documents, error)
