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
    GEN_AI_USAGE_COST_PRICE_TABLE,
    GEN_AI_USAGE_COST_SOURCE,
)
from chatter_otel.instrumentation import records as r
from chatter_otel.instrumentation.ids import ambient_ids
from chatter_otel.instrumentation.invocations import error_type
from chatter_otel.instrumentation.runs import EMPTY_IDS
from chatter_otel.instrumentation.usage import TokenUsage
from chatter_otel.instrumentation.when_imported import WhenImported

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

    from opentelemetry.trace import Span, Tracer

    from chatter_otel.instrumentation.cost import Pricer

__all__ = ["wrap_openai_embeddings"]

_OP = GenAiOperationNameValues.EMBEDDINGS.value
_PROVIDER = "openai"


class _EmbeddingsCall:
    """One embeddings call: owns its span, current for the call, ended in ``__exit__``.

    A context manager so the sync and async wrappers share it; entered and left in the
    wrapper's own frame (and, async, its own task), so the context token never leaks.
    """

    __slots__ = ("_ids", "_pricer", "_request_model", "_start_ns", "_token", "result", "span")

    def __init__(self, tracer: Tracer, pricer: Pricer, kwargs: dict[str, Any]) -> None:
        self._pricer = pricer
        self._token: object | None = None
        self.result: Any = None
        model = kwargs.get("model")
        self._request_model = model if isinstance(model, str) and model else None
        self.span: Span | None = None
        self._ids = EMPTY_IDS
        self._start_ns = time.time_ns()
        try:
            self._ids = ambient_ids(EMPTY_IDS)
            attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: _OP, GEN_AI_PROVIDER_NAME: _PROVIDER,
                                     **self._ids.attributes()}  # fmt: skip
            if self._request_model:
                attrs[GEN_AI_REQUEST_MODEL] = self._request_model
            name = f"{_OP} {self._request_model}" if self._request_model else _OP
            self.span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs,
                                          start_time=self._start_ns)  # fmt: skip
        except Exception:
            internal_error("embeddings.start")

    def __enter__(self) -> _EmbeddingsCall:
        # Current for the call, so the HTTP client's span nests under the embeddings span.
        if self.span is not None:
            try:
                self._token = context.attach(set_span_in_context(self.span))
            except Exception:
                internal_error("embeddings.enter")
        return self

    def __exit__(self, etype: Any, error: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            try:
                context.detach(self._token)  # type: ignore[arg-type]
            except Exception:
                internal_error("embeddings.leave")
        span = self.span
        if span is None:
            return
        end_ns = time.time_ns()
        record = None
        try:
            record = self._finish(span, error, end_ns)
        except Exception:
            internal_error("embeddings.end")
        finally:
            try:  # with its record, for the processors (the GenAI metrics count it)
                r.end_with(span, record, end_ns)
            except Exception:
                internal_error("embeddings.end_span")

    def _finish(self, span: Span, error: BaseException | None, end_ns: int) -> r.EmbeddingsRecord:
        model: str | None = None
        tokens: int | None = None
        cost = None
        etype = None
        if error is not None:
            etype = error_type(error)
            span.set_attribute(ERROR_TYPE, etype)
            span.set_status(Status(StatusCode.ERROR, etype))
        else:
            got = getattr(self.result, "model", None)
            model = got if isinstance(got, str) and got else None
            count = getattr(getattr(self.result, "usage", None), "prompt_tokens", None)
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                tokens = count
            if model:
                span.set_attribute(GEN_AI_RESPONSE_MODEL, model)
            if tokens is not None:
                span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, tokens)
                usage = TokenUsage(input_tokens=tokens, output_tokens=0, total_tokens=tokens)
                cost = self._pricer.cost(usage, (model, self._request_model), _PROVIDER)
                if cost is not None:
                    span.set_attribute(GEN_AI_USAGE_COST_AMOUNT, float(cost.amount))
                    span.set_attribute(GEN_AI_USAGE_COST_CURRENCY, cost.currency)
                    span.set_attribute(GEN_AI_USAGE_COST_SOURCE, cost.source)
                    if cost.table:
                        span.set_attribute(GEN_AI_USAGE_COST_PRICE_TABLE, cost.table)
        ctx = span.get_span_context()
        return r.EmbeddingsRecord(
            format(ctx.span_id, "016x"), format(ctx.trace_id, "032x"), None, self._ids,
            self._start_ns, end_ns, r.ERROR if error is not None else r.OK, etype, etype,
            _PROVIDER, self._request_model, model, tokens,
            cost.amount if cost is not None else None,
        )  # fmt: skip


def _unwrap(module: ModuleType) -> None:
    from opentelemetry.instrumentation.utils import unwrap

    unwrap(module.Embeddings, "create")
    unwrap(module.AsyncEmbeddings, "create")


# Never imported by us: configure() imports no provider SDK the app has not.
_OPENAI_EMBEDDINGS = WhenImported("openai.resources.embeddings", _unwrap)


def wrap_openai_embeddings(tracer: Tracer, pricer: Pricer) -> Callable[[], None]:
    """Wrap the openai SDK's embeddings calls when the SDK is imported (now, if it is already;
    never, if the app never imports it). Returns how to undo it."""
    from wrapt import wrap_function_wrapper

    def sync_create(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        with _EmbeddingsCall(tracer, pricer, kwargs) as call:
            call.result = wrapped(*args, **kwargs)
        return call.result

    async def async_create(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        with _EmbeddingsCall(tracer, pricer, kwargs) as call:
            call.result = await wrapped(*args, **kwargs)
        return call.result

    def wrap(module: ModuleType) -> None:
        wrap_function_wrapper(module.Embeddings, "create", sync_create)
        wrap_function_wrapper(module.AsyncEmbeddings, "create", async_create)

    _OPENAI_EMBEDDINGS.install(wrap)
    return _OPENAI_EMBEDDINGS.remove
