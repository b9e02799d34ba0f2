"""The hooks ``LangGraphInstrumentor`` puts into LangGraph and LangChain (see its module
docstring). Imported only when it instruments: the instrumentor's own module imports neither
library, so it loads (from its entry point, under ``opentelemetry-instrument``) and reports a
missing dependency cleanly where they are not installed."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.tracers.context import register_configure_hook
from langgraph._internal._runnable import RunnableCallable
from langgraph.callbacks import GraphCallbackHandler
from langgraph.errors import GraphInterrupt
from langgraph.pregel.main import Pregel
from opentelemetry import context
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.active import active_handler
from chatter_otel.instrumentation.agents import built_by_factory
from chatter_otel.instrumentation.ids import ids_from_config
from chatter_otel.instrumentation.runs import new_slot
from chatter_otel.instrumentation.when_imported import WhenImported

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from chatter_otel.instrumentation.callbacks import OtelCallbackHandler

__all__ = ["install", "remove"]


def _config_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("config")


try:  # LangGraph's own runnables inside every node; private modules, so optional
    from langgraph.graph._branch import BranchSpec
    from langgraph.pregel._write import ChannelWrite

    _ROUTE: Any = BranchSpec._route
    _WRITE: Any = ChannelWrite
except (ImportError, AttributeError):  # pragma: no cover - a LangGraph that moved them
    _ROUTE = _WRITE = object()  # matches nothing: every callable gets the node context


def _runs_no_app_code(runnable: Any) -> bool:
    """LangGraph's channel writes and branch routing (6 of the 9 callables of the reference
    run) run no app code: a conditional edge's own function is a runnable of its own, wrapped
    itself. Making the node span current around them would only cost time."""
    return type(runnable) is _WRITE or (
        runnable.name == "_route" and getattr(runnable.func, "__func__", None) is _ROUTE
    )


class _ActiveHandlerVar:
    """Stands in for the ``ContextVar`` that ``register_configure_hook`` reads.

    LangChain only calls ``.get()`` on it. A real ContextVar cannot serve: its default is fixed
    when it is made, and the handler must reach every context, fresh threads included, and
    leave them all again at ``uninstrument()``. Hooks cannot be unregistered, so one is
    registered per process and answers None while nothing is instrumented.
    """

    def get(self) -> OtelCallbackHandler | None:
        return active_handler()


_HOOK_VAR = _ActiveHandlerVar()
_hook_registered = False


def _register_hook_once() -> None:
    global _hook_registered  # noqa: PLW0603 - LangChain's hook list is process-wide too
    if not _hook_registered:
        register_configure_hook(_HOOK_VAR, True)  # type: ignore[arg-type]
        _hook_registered = True


def _has_breakpoints(graph: Any, kwargs: Any) -> bool:
    """Static breakpoints on the compiled graph or on this call (``interrupt_before=...``)."""
    return bool(
        getattr(graph, "interrupt_before_nodes", None)
        or getattr(graph, "interrupt_after_nodes", None)
        or kwargs.get("interrupt_before")
        or kwargs.get("interrupt_after")
    )


class _GraphLifecycle(GraphCallbackHandler):
    """LangGraph's own lifecycle callback: a static breakpoint (``interrupt_before`` /
    ``interrupt_after``) pauses a run without raising into any callback LangChain has, so
    ``on_interrupt`` is how it is known. (An ``interrupt()`` is seen where it is raised.)"""

    run_inline = True  # no executor hop for LangChain's own events, which it ignores anyway
    ignore_llm = ignore_chain = ignore_agent = ignore_retriever = ignore_chat_model = True
    ignore_retry = ignore_custom_event = True

    def __init__(self, handler: OtelCallbackHandler) -> None:
        super().__init__()
        self._handler = handler

    def on_interrupt(self, event: Any) -> None:
        if event.status in ("interrupt_before", "interrupt_after") and event.run_id is not None:
            self._handler.graph_paused(event.run_id, event.checkpoint_id)


class _AnnounceGraph:
    """Before ``Pregel.stream``/``astream``: give the run an id and announce it as a graph run
    (and hand LangGraph our lifecycle handler, beside the app's callbacks, for the pauses of
    static breakpoints)."""

    def __init__(self, handler: OtelCallbackHandler) -> None:
        self._handler = handler
        self._lifecycle = _GraphLifecycle(handler)

    def __call__(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        handler = self._handler
        if handler.enabled:
            try:
                args, kwargs = self._announce(instance, args, kwargs)
            except Exception:
                warn_once("announce", "chatter-otel: cannot announce a graph run", exc_info=True)
        return wrapped(*args, **kwargs)

    def _announce(self, graph: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
        config = _config_arg(args, kwargs)
        config = dict(config) if config else {}
        run_id = config.get("run_id")
        if not isinstance(run_id, uuid.UUID):
            # The app's own config object is copied, never mutated.
            run_id = config["run_id"] = uuid.uuid4()
        name = config.get("run_name") or graph.get_name()
        # new_slot() runs here, in the app's own context, so last_run() can see the result.
        self._handler.expect_graph(
            run_id, str(name), ids_from_config(config), new_slot(), built_by_factory(graph)
        )
        if _has_breakpoints(graph, kwargs):  # only then: a handler more costs every event
            config["callbacks"] = self._with_lifecycle(config.get("callbacks"))
        if len(args) > 1:
            args = (args[0], config, *args[2:])
        else:
            kwargs = {**kwargs, "config": config}
        return args, kwargs

    def _with_lifecycle(self, callbacks: Any) -> Any:
        """The app's callbacks (a list or a manager, never changed in place) plus ours."""
        mine = self._lifecycle
        if callbacks is None:
            return [mine]
        if isinstance(callbacks, list):
            return callbacks if mine in callbacks else [*callbacks, mine]
        if isinstance(callbacks, BaseCallbackManager):
            if mine in callbacks.handlers:
                return callbacks
            manager = callbacks.copy()
            manager.add_handler(mine, inherit=False)  # the graph's own run only
            return manager
        return callbacks  # a shape LangChain may accept that we do not know: left alone


class _BudgetGate:
    """Around LangGraph's ``run_with_retry``/``arun_with_retry``: a node's task does not start in
    a run over its budget when the app asked for its exception (``BudgetOptions.raise_error``):
    it raises that instead, as the node itself would have (the one raise into the app)."""

    def __init__(self, handler: OtelCallbackHandler) -> None:
        self._handler = handler

    def __call__(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        task = args[0] if args else kwargs.get("task")
        over = self._handler.budget_error(getattr(task, "config", None))
        if over is not None:
            raise over
        return wrapped(*args, **kwargs)


class _NodeContext:
    """Around ``RunnableCallable.invoke``: the node span is current while the node runs; an
    interrupt raised in it notes the checkpoint its task ran from (what a resume links to)."""

    def __init__(self, handler: OtelCallbackHandler) -> None:
        self._handler = handler

    def __call__(self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if _runs_no_app_code(instance):
            return wrapped(*args, **kwargs)
        config = _config_arg(args, kwargs)
        ctx = self._handler.context_for(config)
        token = context.attach(ctx) if ctx is not None else None
        try:
            return wrapped(*args, **kwargs)
        except GraphInterrupt:
            self._handler.interrupted(config)
            raise
        finally:
            if token is not None:
                context.detach(token)


class _NodeContextAsync(_NodeContext):
    async def __call__(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if _runs_no_app_code(instance):
            return await wrapped(*args, **kwargs)
        config = _config_arg(args, kwargs)
        ctx = self._handler.context_for(config)
        token = context.attach(ctx) if ctx is not None else None
        try:
            return await wrapped(*args, **kwargs)
        except GraphInterrupt:
            self._handler.interrupted(config)
            raise
        finally:
            if token is not None:
                context.detach(token)


def _usage_unless_told_not(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    """``BaseChatOpenAI._should_stream_usage``: True where nothing said either way (the call,
    its ``stream_options``, the model's ``model_kwargs`` or ``stream_usage``); an explicit
    False still wins."""
    asked = args[0] if args else kwargs.get("stream_usage")
    options = kwargs.get("stream_options") or {}
    model_options = (getattr(instance, "model_kwargs", None) or {}).get("stream_options") or {}
    if (asked is None and "include_usage" not in options and "include_usage" not in model_options
            and getattr(instance, "stream_usage", None) is None):  # fmt: skip
        return True
    return wrapped(*args, **kwargs)


def _ask_for_stream_usage(module: ModuleType) -> None:
    wrap_function_wrapper(module.BaseChatOpenAI, "_should_stream_usage", _usage_unless_told_not)


# langchain-openai (and the openai SDK under it) is wrapped when the app imports it, never
# imported by us: an app without OpenAI-compatible models never loads it.
_OPENAI_MODELS = WhenImported(
    "langchain_openai.chat_models.base",
    lambda module: unwrap(module.BaseChatOpenAI, "_should_stream_usage"),
)


def install(handler: OtelCallbackHandler, *, stream_usage: bool) -> None:
    """Put the hooks in for ``handler``; with ``stream_usage``, langchain-openai's models are
    asked for streamed usage (now, or when the app imports them)."""
    _register_hook_once()
    wrap_function_wrapper(Pregel, "stream", _AnnounceGraph(handler))
    wrap_function_wrapper(Pregel, "astream", _AnnounceGraph(handler))
    wrap_function_wrapper(RunnableCallable, "invoke", _NodeContext(handler))
    wrap_function_wrapper(RunnableCallable, "ainvoke", _NodeContextAsync(handler))
    if handler.budget is not None and handler.budget.options.raise_error is not None:
        # the async one returns a coroutine: raising before creating it raises at its await
        for name in ("run_with_retry", "arun_with_retry"):
            wrap_function_wrapper("langgraph.pregel._runner", name, _BudgetGate(handler))
    if stream_usage:
        _OPENAI_MODELS.install(_ask_for_stream_usage)


def remove() -> None:
    import langgraph.pregel._runner as runner

    for name in ("run_with_retry", "arun_with_retry"):
        if hasattr(getattr(runner, name), "__wrapped__"):
            unwrap(runner, name)
    unwrap(Pregel, "stream")
    unwrap(Pregel, "astream")
    unwrap(RunnableCallable, "invoke")
    unwrap(RunnableCallable, "ainvoke")
    _OPENAI_MODELS.remove()
