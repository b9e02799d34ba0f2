"""Embeddings calls as ``embeddings {model}`` spans (CLIENT), with input tokens and cost.

LangChain's embeddings classes emit no callbacks and drop the provider's usage, so the call is
seen one level down, in the openai SDK (``Embeddings.create`` / ``AsyncEmbeddings.create``),
which ``OpenAIEmbeddings`` and every OpenAI-compatible client use: ``gen_ai.operation.name=
embeddings``, ``gen_ai.provider.name=openai``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` and the cost attributes (priced like
chat calls; absent, never 0, when the model has no price). The span is a child of whatever is
current (a node's span, inside a graph). Embeddings are not part of a run's chat usage (the
message's tokens): their tokens and cost are on their spans.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import context
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GenAiOperationNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from chatter_otel._safety import internal_error
from chatter_otel.attributes import (
    GEN_AI_USAGE_COST_AMOUNT,
    GEN_AI_USAGE_COST_CURRENCY,
    GEN_AI_USAGE_COST_SOURCE,
)
from chatter_otel.instrumentation.ids import ambient_ids
from chatter_otel.instrumentation.invocations import error_type
from chatter_otel.instrumentation.runs import EMPTY_IDS
from chatter_otel.instrumentation.usage import TokenUsage

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.trace import Span, Tracer

    from chatter_otel.instrumentation.cost import Pricer

__all__ = ["wrap_openai_embeddings"]

_OP = GenAiOperationNameValues.EMBEDDINGS.value


def _start(tracer: Tracer, kwargs: dict[str, Any]) -> Span | None:
    try:
        model = kwargs.get("model")
        model = model if isinstance(model, str) and model else None
        attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: _OP, GEN_AI_PROVIDER_NAME: "openai",
                                 **ambient_ids(EMPTY_IDS).attributes()}  # fmt: skip
        if model:
            attrs[GEN_AI_REQUEST_MODEL] = model
        name = f"{_OP} {model}" if model else _OP
        return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
    except Exception:
        internal_error("embeddings.start")
        return None


def _end(span: Span | None, result: Any, error: BaseException | None, pricer: Pricer,
         request_model: Any) -> None:  # fmt: skip
    if span is None:
        return
    try:
        if error is not None:
            etype = error_type(error)
            span.set_attribute(ERROR_TYPE, etype)
            span.set_status(Status(StatusCode.ERROR, etype))
        else:
            model = getattr(result, "model", None)
            tokens = getattr(getattr(result, "usage", None), "prompt_tokens", None)
            if isinstance(model, str) and model:
                span.set_attribute(GEN_AI_RESPONSE_MODEL, model)
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
                span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, tokens)
                usage = TokenUsage(input_tokens=tokens, output_tokens=0, total_tokens=tokens)
                cost = pricer.cost(usage, (model, request_model), "openai")
                if cost is not None:
                    span.set_attribute(GEN_AI_USAGE_COST_AMOUNT, float(cost.amount))
                    span.set_attribute(GEN_AI_USAGE_COST_CURRENCY, cost.currency)
                    span.set_attribute(GEN_AI_USAGE_COST_SOURCE, cost.source)
    except Exception:
        internal_error("embeddings.end")
    finally:
        try:
            span.end(end_time=time.time_ns())
        except Exception:
            internal_error("embeddings.end_span")


def _enter(span: Span | None) -> object | None:
    # Current for the call, so the HTTP client's span nests under the embeddings span; attached
    # and detached in the wrapper's own frame (and, async, its own task), so no token leaks.
    if span is None:
        return None
    try:
        return context.attach(set_span_in_context(span))
    except Exception:
        internal_error("embeddings.enter")
        return None


def _leave(token: object | None) -> None:
    if token is not None:
        try:
            context.detach(token)  # type: ignore[arg-type]
        except Exception:
            internal_error("embeddings.leave")


def wrap_openai_embeddings(tracer: Tracer, pricer: Pricer) -> Callable[[], None] | None:
    """Wrap the openai SDK's embeddings calls; None when the SDK is not installed."""
    try:
        from openai.resources.embeddings import AsyncEmbeddings, Embeddings
    except ImportError:
        return None
    from opentelemetry.instrumentation.utils import unwrap
    from wrapt import wrap_function_wrapper

    def sync_create(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        span = _start(tracer, kwargs)
        token = _enter(span)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            _end(span, None, exc, pricer, kwargs.get("model"))
            raise
        finally:
            _leave(token)
        _end(span, result, None, pricer, kwargs.get("model"))
        return result

    async def async_create(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        span = _start(tracer, kwargs)
        token = _enter(span)
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _end(span, None, exc, pricer, kwargs.get("model"))
            raise
        finally:
            _leave(token)
        _end(span, result, None, pricer, kwargs.get("model"))
        return result

    wrap_function_wrapper(Embeddings, "create", sync_create)
    wrap_function_wrapper(AsyncEmbeddings, "create", async_create)

    def undo() -> None:
        unwrap(Embeddings, "create")
        unwrap(AsyncEmbeddings, "create")

    return undo
