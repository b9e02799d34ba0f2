"""While a chat model calls its provider, our chat span is current and marked as an inference
in progress, so a provider instrumentation beside ours does not count the call again.

A provider instrumentation (``opentelemetry-instrumentation-openai-v2`` or any other built on
``opentelemetry-util-genai``; OpenLLMetry's ``opentelemetry-instrumentation-openai``) would
otherwise record each call a second time: a second chat span beside ours, and its tokens again
in ``gen_ai.client.token.usage``. Both ecosystems have a protocol for a framework above a
provider, and we follow both:

* util-genai: the framework's inference puts an ``InferenceData`` under
  ``CLIENT_INFERENCE_CONTEXT_KEY``; a provider invocation that finds one records no span,
  metric or event, and publishes what it saw (server address and port) into it, which our
  chat span then carries (``server.address``, ``server.port``).
* OpenLLMetry: a provider call under ``suppress_language_model_instrumentation`` is skipped.

With our span current, the HTTP client's span of the call nests under it, and a provider
instrumentation that knows neither protocol nests its span under ours (its metrics still count
the call: see the spans and metrics reference).

Where: ``BaseChatModel._generate_with_cache`` / ``_agenerate_with_cache`` (``invoke``,
``ainvoke``, ``batch`` and graph streaming, which streams inside them) get the call's run
manager, so the span is the call's own. ``BaseChatModel.stream`` / ``astream`` start the call
inside their first step: the first chat start in that step marks the step's scope, and every
later step re-enters it. Between chunks the app's own context is back, so spans the app starts
while it consumes a stream are not ours. (LangChain 1.8's v3 ``stream_events`` and plain-text
LLMs are not covered: a provider span there stays beside ours.)
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context, trace
from opentelemetry.context import Context

from chatter_otel.instrumentation.active import active_handler
from chatter_otel.instrumentation.when_imported import WhenImported

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from types import ModuleType

    from chatter_otel.instrumentation.calls import LLMInvocation

__all__ = ["install", "remove"]

# OpenLLMetry's key (opentelemetry.semconv_ai.SUPPRESS_LANGUAGE_MODEL_INSTRUMENTATION_KEY).
SUPPRESS_LLM_KEY = "suppress_language_model_instrumentation"


# (context key, data class): util-genai is there wherever a provider instrumentation built
# on it is; without it, nothing reads the key.
# Looked up, never imported: a provider instrumentation built on util-genai has imported it
# (importing it here would cost configure() 70 ms for apps that have none). util-genai before
# 1.2 has neither name, and no provider instrumentation on it looks.
_GENAI_MODULES = (
    "opentelemetry.util.genai.invocation",
    "opentelemetry.util.genai._inference_invocation",
)
_found: tuple[str, Callable[[], Any]] | None = None


def _inference_marker() -> tuple[str, Callable[[], Any]] | None:
    global _found  # noqa: PLW0603 - found once per process, like the module it reads
    if _found is None:
        for name in _GENAI_MODULES:
            module = sys.modules.get(name)
            key = getattr(module, "CLIENT_INFERENCE_CONTEXT_KEY", None)
            data = getattr(module, "InferenceData", None)
            if isinstance(key, str) and callable(data):
                _found = (key, data)
                break
    return _found


def provider_context(inv: LLMInvocation) -> Context:
    """The context a provider call of ``inv`` runs in, built once per call: the span and the
    markers go into one new context (each ``set_value`` copied the whole context again)."""
    values: dict[str, Any] = {**trace.set_span_in_context(inv.span), SUPPRESS_LLM_KEY: True}
    marker = _inference_marker()
    if marker is not None:
        key, data = marker
        inv.provider_data = data()
        values[key] = inv.provider_data
    return Context(values)


class _Scope:
    """One ``stream``/``astream`` call: its chat call's context, once the call has started."""

    __slots__ = ("ctx", "token")

    def __init__(self) -> None:
        self.ctx: Context | None = None
        self.token: object = None

    def started(self, inv: LLMInvocation) -> None:
        """The stream's chat call started, inside the current step: enter its context now."""
        if self.ctx is None:
            self.ctx = provider_context(inv)
            self.token = context.attach(self.ctx)

    def enter(self) -> Any:
        self.token = context.attach(self.ctx) if self.ctx is not None else None
        return _scope.set(self)

    def leave(self, mark: Any) -> None:
        # Same frame as enter (a step of the wrapper below), so the detach is always valid.
        if self.token is not None:
            context.detach(self.token)  # type: ignore[arg-type]
            self.token = None
        _scope.reset(mark)


_scope: ContextVar[_Scope | None] = ContextVar("chatter_otel_stream_scope", default=None)


def stream_scope() -> _Scope | None:
    """The ``stream``/``astream`` step running now, if any (read by the chat start)."""
    return _scope.get()


def _call_context(kwargs: dict[str, Any], args: tuple[Any, ...]) -> Context | None:
    handler = active_handler()
    manager = kwargs.get("run_manager") or (args[2] if len(args) > 2 else None)
    if handler is None or manager is None:
        return None
    inv = handler.llm_invocation(getattr(manager, "run_id", None))
    return provider_context(inv) if inv is not None else None


def _generate(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    ctx = _call_context(kwargs, args)
    if ctx is None:
        return wrapped(*args, **kwargs)
    token = context.attach(ctx)
    try:
        return wrapped(*args, **kwargs)
    finally:
        context.detach(token)


async def _agenerate(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    ctx = _call_context(kwargs, args)
    if ctx is None:
        return await wrapped(*args, **kwargs)
    token = context.attach(ctx)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        context.detach(token)


def _stream(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    return _steps(wrapped(*args, **kwargs))


def _astream(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    return _asteps(wrapped(*args, **kwargs))


def _steps(inner: Iterator[Any]) -> Iterator[Any]:
    scope = _Scope()
    try:
        while True:
            mark = scope.enter()
            try:
                item = next(inner)
            except StopIteration:
                return
            finally:
                scope.leave(mark)
            yield item
    finally:  # closed early (the app stopped reading): the model's own cleanup in its scope
        mark = scope.enter()
        try:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        finally:
            scope.leave(mark)


async def _asteps(inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
    scope = _Scope()
    try:
        while True:
            mark = scope.enter()
            try:
                item = await anext(inner)
            except StopAsyncIteration:
                return
            finally:
                scope.leave(mark)
            yield item
    finally:
        mark = scope.enter()
        try:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            scope.leave(mark)


_WRAPPED = (("_generate_with_cache", _generate), ("_agenerate_with_cache", _agenerate),
            ("stream", _stream), ("astream", _astream))  # fmt: skip


def _wrap(module: ModuleType) -> None:
    from wrapt import wrap_function_wrapper

    for name, wrapper in _WRAPPED:
        wrap_function_wrapper(module.BaseChatModel, name, wrapper)


def _unwrap(module: ModuleType) -> None:
    from opentelemetry.instrumentation.utils import unwrap

    for name, _ in _WRAPPED:
        unwrap(module.BaseChatModel, name)


# Instrumenting imports no part of LangChain the app has not (benchmarks/bench_startup.py).
_CHAT_MODELS = WhenImported("langchain_core.language_models.chat_models", _unwrap)


def install() -> None:
    _CHAT_MODELS.install(_wrap)


def remove() -> None:
    _CHAT_MODELS.remove()
