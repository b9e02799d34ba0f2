"""Embeddings calls as `embeddings {model}` spans, from real OpenAIEmbeddings over loopback."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price
from langchain_openai import OpenAIEmbeddings
from langgraph.graph import END, START, StateGraph
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from typing_extensions import TypedDict

from chatter_otel import track_workflow


def _client(server: Any, model: str = "text-embedding-3-small") -> OpenAIEmbeddings:
    # check_embedding_ctx_length=False: the texts go as strings, no tokenizer download.
    return OpenAIEmbeddings(model=model, base_url=server.url, api_key="sk-test",  # type: ignore[arg-type]
                            check_embedding_ctx_length=False, max_retries=0)  # fmt: skip


def _expected_cost(tokens: int) -> float:
    price = calc_price(Usage(input_tokens=tokens), model_ref="text-embedding-3-small",
                       provider_id="openai")  # fmt: skip
    return float(Decimal(price.total_price))


class S(TypedDict):
    text: str
    dims: int


def test_sync_embeddings_span(spans: Any, openai_server: Any) -> None:
    vectors = _client(openai_server).embed_documents(["one two three", "four five"])
    assert len(vectors) == 2
    span = spans.one("embeddings text-embedding-3-small")
    assert span.kind is SpanKind.CLIENT
    a = span.attributes
    assert a["gen_ai.operation.name"] == "embeddings"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "text-embedding-3-small"
    assert a["gen_ai.response.model"] == "text-embedding-3-small"
    assert a["gen_ai.usage.input_tokens"] == 5
    assert isinstance(a["gen_ai.usage.input_tokens"], int)
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(_expected_cost(5))
    assert a["gen_ai.usage.cost.currency"] == "USD"
    assert "gen_ai.usage.output_tokens" not in a


async def test_async_embeddings_under_their_node(spans: Any, openai_server: Any) -> None:
    client = _client(openai_server)

    async def embed(state: S) -> S:
        return {"text": state["text"], "dims": len(await client.aembed_query(state["text"]))}

    g = StateGraph(S)
    g.add_node("embed", embed)
    g.add_edge(START, "embed")
    g.add_edge("embed", END)
    async with track_workflow("w", conversation_id="c-e"):
        out = await g.compile(name="rag").ainvoke({"text": "a b c d", "dims": 0})
    assert out["dims"] == 3
    span = spans.one("embeddings text-embedding-3-small")
    assert spans.parent_of(span).name == "invoke_node embed"
    assert span.attributes["gen_ai.usage.input_tokens"] == 4
    assert span.attributes["gen_ai.conversation.id"] == "c-e"


def test_an_unpriced_model_has_no_cost(spans: Any, openai_server: Any) -> None:
    openai_server.embedding_model = "house-embedder-v0"
    _client(openai_server, "house-embedder-v0").embed_query("x y")
    a = spans.one("embeddings house-embedder-v0").attributes
    assert a["gen_ai.usage.input_tokens"] == 2
    assert "gen_ai.usage.cost.amount" not in a  # absent, never 0


def test_a_failing_embeddings_call(spans: Any, openai_server: Any) -> None:
    openai_server.status = 500
    with pytest.raises(openai.InternalServerError):
        _client(openai_server).embed_query("secret words")
    span = spans.one("embeddings text-embedding-3-small")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "openai.InternalServerError"
    assert "secret" not in (span.status.description or "")


def test_uninstrument_removes_the_wrapper(instrument: Any, openai_server: Any) -> None:
    from openai.resources.embeddings import Embeddings

    instrument()
    assert hasattr(Embeddings.create, "__wrapped__")
    from chatter_otel import LangGraphInstrumentor

    LangGraphInstrumentor().uninstrument()
    assert not hasattr(Embeddings.create, "__wrapped__")


def test_the_http_request_runs_inside_the_embeddings_span(spans: Any, openai_server: Any) -> None:
    seen: list[Any] = []

    def hook(request: httpx.Request) -> None:
        seen.append(trace.get_current_span().get_span_context())

    http = httpx.Client(event_hooks={"request": [hook]})
    client = OpenAIEmbeddings(model="text-embedding-3-small", base_url=openai_server.url,
                              api_key="sk-test", check_embedding_ctx_length=False,  # type: ignore[arg-type]
                              http_client=http)  # fmt: skip
    client.embed_query("one")
    span = spans.one("embeddings text-embedding-3-small")
    assert [c.span_id for c in seen] == [span.context.span_id]
    assert not trace.get_current_span().get_span_context().is_valid  # detached after the call


def test_embeddings_are_counted_by_the_genai_metrics(spans: Any, openai_server: Any) -> None:
    """The call's record reaches the processors: tokens, duration and cost in the metrics, with
    gen_ai.operation.name=embeddings; a failed call is counted with its error.type."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from chatter_otel.sinks.analytics import AnalyticsSpanProcessor

    reader = InMemoryMetricReader()
    spans.provider.add_span_processor(
        AnalyticsSpanProcessor(None, MeterProvider(metric_readers=[reader]))
    )
    _client(openai_server).embed_documents(["one two three", "four five"])
    openai_server.status = 500
    with pytest.raises(openai.InternalServerError):
        _client(openai_server).embed_query("x")
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    (tokens,) = points["gen_ai.client.token.usage"]
    assert tokens.sum == 5 and tokens.count == 1
    assert dict(tokens.attributes) == {
        "gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "text-embedding-3-small",
        "gen_ai.response.model": "text-embedding-3-small", "gen_ai.token.type": "input",
    }  # fmt: skip
    durations = {p.attributes.get("error.type"): p.count
                 for p in points["gen_ai.client.operation.duration"]}  # fmt: skip
    assert durations == {None: 1, "openai.InternalServerError": 1}
    (cost,) = points["chatter.gen_ai.cost"]
    assert cost.value == pytest.approx(_expected_cost(5))
