"""``LangGraphInstrumentor``: LangGraph and LangChain runs become GenAI spans, no app change.

Three hooks, each undone by ``uninstrument()``:

* LangChain's own ``register_configure_hook``: every callback manager LangChain configures gets
  our inline handler, so every run (chains, chat models, tools) is seen, however the app builds
  its config. (Cheaper than wrapping ``BaseCallbackManager.__init__``: it runs once per
  configured runnable, not once per child manager.)
* ``Pregel.stream`` / ``Pregel.astream`` (which ``invoke``, ``ainvoke``, ``batch`` and
  ``astream_events`` all go through): the graph run is announced by run id, so its chain start
  becomes an ``invoke_workflow`` span and not just another chain.
* ``RunnableCallable.invoke`` / ``ainvoke`` (where a node's function runs): the node's span is
  made current for the call, attached and detached in that one frame, so spans the app's own code
  starts inside a node are children of the node span.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from langchain_core.tracers.context import register_configure_hook
from langgraph._internal._runnable import RunnableCallable
from langgraph.errors import GraphInterrupt
from langgraph.pregel.main import Pregel
from opentelemetry import context
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import get_tracer
from wrapt import wrap_function_wrapper

from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.agents import built_by_factory
from chatter_otel.instrumentation.callbacks import (
    OtelCallbackHandler,
    active_handler,
    set_active_handler,
)
from chatter_otel.instrumentation.cost import Pricer, warm_up
from chatter_otel.instrumentation.embeddings import wrap_openai_embeddings
from chatter_otel.instrumentation.ids import ids_from_config
from chatter_otel.instrumentation.runs import new_slot
from chatter_otel.instrumentation.sampling import always_record
from chatter_otel.instrumentation.settings import Settings
from chatter_otel.propagation import throttle_hostile_header_logs
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

__all__ = ["LangGraphInstrumentor"]

_INSTRUMENTS = ("langchain-core >= 1.0", "langgraph >= 1.0")


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


class _AnnounceGraph:
    """Before ``Pregel.stream``/``astream``: give the run an id and announce it as a graph run."""

    def __init__(self, handler: OtelCallbackHandler) -> None:
        self._handler = handler

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
        if len(args) > 1:
            args = (args[0], config, *args[2:])
        else:
            kwargs = {**kwargs, "config": config}
        return args, kwargs


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


def _ask_for_stream_usage() -> bool:
    try:
        from langchain_openai.chat_models.base import BaseChatOpenAI
    except ImportError:  # no OpenAI-compatible models in this app
        return False
    wrap_function_wrapper(BaseChatOpenAI, "_should_stream_usage", _usage_unless_told_not)
    return True


class LangGraphInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instrument LangGraph and LangChain with OpenTelemetry GenAI spans.

    ``LangGraphInstrumentor().instrument(tracer_provider=..., capture_content=..., prices=...,
    redact=..., max_content_length=..., max_runs=..., max_run_age_s=..., stream_usage=...,
    semconv_opt_in=...)``; each option falls back to its environment variable (see README),
    then to the default. Idempotent.
    """

    _handler: OtelCallbackHandler | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    @property
    def handler(self) -> OtelCallbackHandler | None:
        """The callback handler while instrumented (for diagnostics and tests)."""
        return self._handler

    def _instrument(self, **kwargs: Any) -> None:
        settings = Settings.resolve(
            capture_content=kwargs.get("capture_content"),
            capture_exception_text=kwargs.get("capture_exception_text"),
            max_content_length=kwargs.get("max_content_length"),
            redact=kwargs.get("redact"),
            max_runs=kwargs.get("max_runs"),
            max_run_age_s=kwargs.get("max_run_age_s"),
            prices=kwargs.get("prices"),
            stream_usage=kwargs.get("stream_usage"),
            semconv_opt_in=kwargs.get("semconv_opt_in"),
        )
        # Recorded whatever the sampler says (at least RECORD_ONLY): the processors see every
        # run of ours; only sampled spans are exported (instrumentation/sampling.py).
        tracer = always_record(
            get_tracer(
                "chatter_otel", __version__, kwargs.get("tracer_provider"), schema_url=SCHEMA_URL
            )
        )
        handler = OtelCallbackHandler(tracer, settings, Pricer(settings.prices))
        throttle_hostile_header_logs()
        warm_up()
        _register_hook_once()
        wrap_function_wrapper(Pregel, "stream", _AnnounceGraph(handler))
        wrap_function_wrapper(Pregel, "astream", _AnnounceGraph(handler))
        wrap_function_wrapper(RunnableCallable, "invoke", _NodeContext(handler))
        wrap_function_wrapper(RunnableCallable, "ainvoke", _NodeContextAsync(handler))
        self._stream_usage = settings.stream_usage and _ask_for_stream_usage()
        self._unwrap_embeddings = wrap_openai_embeddings(tracer, handler.pricer)
        self._handler = handler
        set_active_handler(handler)
        if kwargs.get("tracer_provider") is None:
            # Instrumented on its own (`opentelemetry-instrument` loads it from its entry point,
            # after the distro set up the SDK): the rest of configure() too, on that provider.
            from chatter_otel.telemetry import configure_for_zero_code

            self._telemetry = configure_for_zero_code()

    _telemetry: Any = None
    _stream_usage = False
    _unwrap_embeddings: Any = None

    def _uninstrument(self, **kwargs: Any) -> None:
        unwrap(Pregel, "stream")
        unwrap(Pregel, "astream")
        unwrap(RunnableCallable, "invoke")
        unwrap(RunnableCallable, "ainvoke")
        if self._unwrap_embeddings is not None:
            self._unwrap_embeddings()
            self._unwrap_embeddings = None
        if self._stream_usage:
            from langchain_openai.chat_models.base import BaseChatOpenAI

            unwrap(BaseChatOpenAI, "_should_stream_usage")
            self._stream_usage = False
        handler = self._handler
        if handler is not None:
            # Managers built before this point still hold the handler: make it inert, and end
            # what it had open so no span is left dangling.
            handler.enabled = False
            handler.close_all()
        self._handler = None
        set_active_handler(None)
        telemetry, self._telemetry = self._telemetry, None
        if telemetry is not None:
            telemetry.shutdown()
