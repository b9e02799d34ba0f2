"""A real ``ChatOpenAI`` talking HTTP to an OpenAI-compatible server on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from genai_prices import Usage, calc_price
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from opentelemetry.trace import SpanKind, StatusCode

from chatter_otel import track_workflow
from chatter_otel.reference.demo import build_chat_graph

if TYPE_CHECKING:
    from decimal import Decimal


def _model(server: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model="gpt-4o-mini", base_url=server.url, api_key="sk-loopback", max_retries=0, **kw
    )


def _expected_cost(usage: dict[str, Any]) -> Decimal:
    return calc_price(
        Usage(
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            cache_read_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            output_reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"],
        ),
        "gpt-4o-mini-2024-07-18",
        provider_id="openai",
    ).total_price


def _assert_chat(span: Any, server: Any, *, stream: bool) -> None:
    a = span.attributes
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == server.model
    assert a["gen_ai.usage.input_tokens"] == server.usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == server.usage["completion_tokens"]
    assert (
        a["gen_ai.usage.cache_read.input_tokens"]
        == server.usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.request.stream"] is stream
    assert a["gen_ai.usage.cost.source"] == "local"
    assert a["gen_ai.usage.cost.amount"] == float(_expected_cost(server.usage))
    if stream:
        # langchain-openai replaces streamed chunks' ids with LangChain's run-derived id, so the
        # provider's response id is not available, and none is made up.
        assert "gen_ai.response.id" not in a
    else:
        assert a["gen_ai.response.id"] == "chatcmpl-loopback-1"


def test_plain_call(spans: Any, openai_server: Any) -> None:
    out = _model(openai_server).invoke("Say hello")
    assert out.content == openai_server.content
    _assert_chat(spans.one("chat gpt-4o-mini"), openai_server, stream=False)
    assert openai_server.requests[0]["model"] == "gpt-4o-mini"


def test_streamed_call_with_stream_usage(spans: Any, openai_server: Any) -> None:
    chunks = list(_model(openai_server, stream_usage=True).stream("Say hello"))
    assert "".join(c.content for c in chunks) == openai_server.content
    assert openai_server.requests[0]["stream_options"] == {"include_usage": True}
    span = spans.one("chat gpt-4o-mini")
    _assert_chat(span, openai_server, stream=True)
    assert span.attributes["gen_ai.response.time_to_first_chunk"] > 0


async def test_async_streamed_in_a_graph(spans: Any, openai_server: Any) -> None:
    graph = build_chat_graph(_model(openai_server, stream_usage=True), tools=None)
    with track_workflow("chat-request", conversation_id="c-42") as run:
        events = [
            e async for e in graph.astream_events(
                {"messages": [HumanMessage("hello")]}, version="v2"
            )
        ]  # fmt: skip
    assert any(e["event"] == "on_chat_model_stream" for e in events)
    span = spans.one("chat gpt-4o-mini")
    _assert_chat(span, openai_server, stream=True)
    assert span.attributes["gen_ai.conversation.id"] == "c-42"
    assert run.usage.prompt_tokens == openai_server.usage["prompt_tokens"]
    assert run.usage.completion_tokens == openai_server.usage["completion_tokens"]
    assert run.usage.total_tokens == openai_server.usage["total_tokens"]
    assert run.usage.cost == _expected_cost(openai_server.usage)
    assert run.usage.provider == "openai"
    assert run.usage.model == openai_server.model


def test_stream_without_usage_is_flagged(spans: Any, openai_server: Any) -> None:
    list(_model(openai_server, stream_usage=False).stream("Say hello"))
    a = spans.one("chat gpt-4o-mini").attributes
    assert a["chatter.usage.missing"] is True
    assert "gen_ai.usage.input_tokens" not in a
    assert "gen_ai.usage.cost.amount" not in a


def test_server_error_is_recorded_and_raised(spans: Any, openai_server: Any) -> None:
    import openai

    openai_server.status = 500
    with pytest.raises(openai.InternalServerError) as caught:
        _model(openai_server).invoke("Say hello")
    span = spans.one("chat gpt-4o-mini")
    assert span.status.status_code is StatusCode.ERROR
    # the fully qualified class the app caught (langchain-openai's subclass of the openai one)
    cls = type(caught.value)
    assert span.attributes["error.type"] == f"{cls.__module__}.{cls.__qualname__}"


def _unset_model(server: Any) -> Any:
    """ChatOpenAI as a host app builds it: a base URL, no word about stream usage."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="gpt-4o-mini", base_url=server.url, api_key="k")


def test_a_streamed_call_without_usage_is_said_once_and_counted_missing(
    spans: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = _unset_model(openai_server)
    for _ in range(3):
        with track_workflow("w") as run:
            list(model.stream("Say hello"))
    assert "stream_options" not in openai_server.requests[-1]
    assert run.usage.usage_missing_calls == 1 and run.usage.total_tokens is None  # never 0
    lines = [r.getMessage() for r in caplog.records if "reported no token usage" in r.getMessage()]
    assert len(lines) == 1  # once a minute per model, not per call
    assert "gpt-4o-mini" in lines[0] and "stream_usage=True" in lines[0]
    assert "CHATTER_OTEL_STREAM_USAGE" in lines[0]


def test_the_stream_usage_opt_in_asks_for_usage(instrument: Any, openai_server: Any) -> None:
    spans = instrument(stream_usage=True, prices={})
    with track_workflow("w") as run:
        list(_unset_model(openai_server).stream("Say hello"))
    assert openai_server.requests[-1]["stream_options"] == {"include_usage": True}
    assert run.usage.total_tokens == openai_server.usage["total_tokens"]
    assert run.usage.usage_missing_calls == 0
    assert spans.one("chat gpt-4o-mini").attributes["gen_ai.usage.input_tokens"] == 23
    # an explicit no still wins
    list(_model(openai_server, stream_usage=False).stream("Say hello"))
    assert "stream_options" not in openai_server.requests[-1]
