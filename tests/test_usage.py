"""Usage from every shape a LangChain chat model reports, and bad usage that must not hurt."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

import chatter_otel
from chatter_otel import track_workflow


class Scripted(BaseChatModel):
    """Returns a fixed message and llm_output, as a provider integration would."""

    message: AIMessage
    llm_output: dict[str, Any] | None = None
    provider: str = "openai"
    model: str = "gpt-4o-mini"

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _get_ls_params(self, stop: Any = None, **kwargs: Any) -> Any:
        p = super()._get_ls_params(stop=stop, **kwargs)
        p["ls_provider"] = self.provider
        p["ls_model_name"] = self.model
        return p

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
        return ChatResult(
            generations=[ChatGeneration(message=self.message)], llm_output=self.llm_output
        )

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
        yield ChatGenerationChunk(message=AIMessageChunk(content="par"))
        yield ChatGenerationChunk(message=AIMessageChunk(content="tial"))
        last = AIMessageChunk(
            content="",
            usage_metadata=self.message.usage_metadata,
            response_metadata=self.message.response_metadata,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)


def _chat_attrs(spans: Any, model: Scripted, stream: bool = False) -> dict[str, Any]:
    spans.clear()
    if stream:
        assert "".join(c.content for c in model.stream("hi")) == "partial"
    else:
        model.invoke("hi")
    (span,) = spans.starting("chat")
    return dict(span.attributes)


USAGE_KEYS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.reasoning.output_tokens",
)


def _usage(attrs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(attrs.get(k) for k in USAGE_KEYS)


def test_usage_metadata_with_details(spans: Any) -> None:
    msg = AIMessage(
        "ok",
        usage_metadata={
            "input_tokens": 120,
            "output_tokens": 40,
            "total_tokens": 160,
            "input_token_details": {"cache_read": 100, "cache_creation": 10},
            "output_token_details": {"reasoning": 25},
        },
    )
    a = _chat_attrs(spans, Scripted(message=msg))
    assert _usage(a) == (120, 40, 100, 10, 25)
    assert all(type(a[k]) is int for k in USAGE_KEYS)


def test_openai_token_usage_in_response_metadata(spans: Any) -> None:
    msg = AIMessage(
        "ok",
        response_metadata={
            "token_usage": {
                "prompt_tokens": 50,
                "completion_tokens": 12,
                "total_tokens": 62,
                "prompt_tokens_details": {"cached_tokens": 32},
                "completion_tokens_details": {"reasoning_tokens": 4},
            },
            "model_name": "gpt-4o-mini-2024-07-18",
            "finish_reason": "length",
            "id": "chatcmpl-abc",
        },
    )
    a = _chat_attrs(spans, Scripted(message=msg))
    assert _usage(a) == (50, 12, 32, None, 4)
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.response.id"] == "chatcmpl-abc"


def test_llm_output_token_usage(spans: Any) -> None:
    a = _chat_attrs(
        spans,
        Scripted(
            message=AIMessage("ok"),
            llm_output={
                "token_usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                "model_name": "gpt-4o",
            },
        ),
    )
    assert _usage(a) == (9, 3, None, None, None)
    assert a["gen_ai.response.model"] == "gpt-4o"


def test_anthropic_usage_counts_cache_into_input(spans: Any) -> None:
    msg = AIMessage(
        "ok",
        response_metadata={
            "usage": {
                "input_tokens": 20,
                "output_tokens": 30,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 5,
            },
            "stop_reason": "end_turn",
            "model": "claude-3-5-haiku-20241022",
        },
    )
    a = _chat_attrs(spans, Scripted(message=msg, provider="anthropic", model="claude-3-5-haiku"))
    # the GenAI conventions count cache reads and writes in input tokens
    assert _usage(a) == (125, 30, 100, 5, None)
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.response.finish_reasons"] == ("end_turn",)


def test_streamed_usage_from_the_last_chunk(spans: Any) -> None:
    msg = AIMessage("ok", usage_metadata={"input_tokens": 7, "output_tokens": 2, "total_tokens": 9})
    a = _chat_attrs(spans, Scripted(message=msg), stream=True)
    assert _usage(a)[:2] == (7, 2)
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.time_to_first_chunk"] > 0


def test_missing_usage_sets_the_flag_and_invents_nothing(spans: Any) -> None:
    a = _chat_attrs(spans, Scripted(message=AIMessage("ok")))
    assert a["chatter.usage.missing"] is True
    assert _usage(a) == (None,) * 5
    assert "gen_ai.usage.cost.amount" not in a
    with track_workflow("t") as run:
        Scripted(message=AIMessage("ok")).invoke("hi")
    assert run.usage.llm_calls == 1
    assert run.usage.usage_missing_calls == 1
    assert run.usage.prompt_tokens is None
    assert run.usage.total_tokens is None
    assert run.usage.cost is None


@pytest.mark.parametrize(
    "bad",
    [None, "12", -5, 10**13, 3.5, True, [1], {"a": 1}, float("nan"), float("inf")],
    ids=repr,
)
def test_malformed_counts_are_dropped_never_raised(
    spans: Any, bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    msg = AIMessage("ok")
    # pydantic validates usage_metadata on construction; real providers' raw dicts are not
    msg.usage_metadata = {"input_tokens": bad, "output_tokens": 4, "total_tokens": bad}
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        out = Scripted(message=msg).invoke("hi")
    assert out.content == "ok"  # the app's result is untouched
    (span,) = spans.starting("chat")
    a = span.attributes
    assert "gen_ai.usage.input_tokens" not in a
    assert a["gen_ai.usage.output_tokens"] == 4
    assert "chatter.usage.missing" not in a


def test_malformed_warning_is_rate_limited(spans: Any, caplog: pytest.LogCaptureFixture) -> None:
    msg = AIMessage("ok")
    msg.usage_metadata = {"input_tokens": "lots", "output_tokens": 1, "total_tokens": 1}
    model = Scripted(message=msg)
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        for _ in range(20):
            model.invoke("hi")
    lines = [r for r in caplog.records if "malformed token count" in r.getMessage()]
    assert len(lines) <= 1  # at most one a minute per field (0 if an earlier test logged it)
    assert len(spans.starting("chat")) == 20


def test_garbage_shapes_do_not_raise(spans: Any) -> None:
    msg = AIMessage("ok", response_metadata={"token_usage": "n/a", "usage": [1, 2]})
    a = _chat_attrs(spans, Scripted(message=msg, llm_output={"token_usage": 7}))
    assert a["chatter.usage.missing"] is True


def test_provider_reported_cost_wins(spans: Any) -> None:
    msg = AIMessage(
        "ok",
        response_metadata={
            "token_usage": {
                "prompt_tokens": 1000,
                "completion_tokens": 100,
                "total_tokens": 1100,
                "cost": 0.0123,
            }
        },
    )
    a = _chat_attrs(spans, Scripted(message=msg))
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(0.0123)
    assert a["gen_ai.usage.cost.source"] == "provider"
    assert a["gen_ai.usage.cost.currency"] == "USD"


def test_provider_names_map_to_the_spec(spans: Any) -> None:
    msg = AIMessage("ok", usage_metadata={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2})
    cases = {
        "openai": "openai",
        "azure": "azure.ai.openai",
        "anthropic": "anthropic",
        "bedrock": "aws.bedrock",
        "google_genai": "gcp.gemini",
        "google_vertexai": "gcp.vertex_ai",
        "mistralai": "mistral_ai",
        "xai": "x_ai",
        "SomeNewVendor": "somenewvendor",
    }
    for ls_provider, expected in cases.items():
        a = _chat_attrs(spans, Scripted(message=msg, provider=ls_provider))
        assert a["gen_ai.provider.name"] == expected, ls_provider


def test_last_run_reads_usage_without_wrapping(spans: Any) -> None:
    from langchain_core.messages import HumanMessage

    from chatter_otel.reference.demo import build_chat_graph

    build_chat_graph().invoke({"messages": [HumanMessage("weather in Tokyo")]})
    run = chatter_otel.last_run()
    assert run is not None
    wf = spans.one("invoke_workflow chat")
    assert run.trace_id == format(wf.context.trace_id, "032x")
    assert run.usage.prompt_tokens == wf.attributes["gen_ai.usage.input_tokens"]
    assert run.usage.completion_tokens == wf.attributes["gen_ai.usage.output_tokens"]
    assert run.usage.total_tokens == run.usage.prompt_tokens + run.usage.completion_tokens
    assert run.usage.llm_calls == 2 and run.usage.tool_calls == 1
    assert run.usage.provider == "chatter.local" and run.usage.model == "chatter-local-1"
    assert run.usage.cost is not None and float(run.usage.cost) == pytest.approx(
        wf.attributes["gen_ai.usage.cost.amount"]
    )
    assert isinstance(run.usage.response_time_ms, int) and run.usage.response_time_ms >= 0
