"""Prompt and completion content: off by default, opt-in, capped as valid JSON, redactable."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LocalChatModel

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
CONTENT_KEYS = (
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
)


def test_off_by_default(spans: Any) -> None:
    build_chat_graph().invoke(Q)
    for s in spans.all:
        for key in CONTENT_KEYS:
            assert key not in s.attributes, (s.name, key)


def test_env_var_turns_it_on(instrument: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    spans = instrument()
    build_chat_graph().invoke(Q)
    first = min(spans.named("chat chatter-local-1"), key=lambda s: s.start_time)
    inp = json.loads(first.attributes["gen_ai.input.messages"])
    assert inp == [
        {"role": "user", "parts": [{"type": "text", "content": "What is the weather in Paris?"}]}
    ]
    out = json.loads(first.attributes["gen_ai.output.messages"])
    assert out[0]["role"] == "assistant"
    assert out[0]["finish_reason"] == "tool_calls"
    call = out[0]["parts"][0]
    assert call["type"] == "tool_call" and call["name"] == "get_weather"
    assert call["arguments"] == {"city": "Paris"}
    tool = spans.one("execute_tool get_weather")
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"city": "Paris"}
    assert json.loads(tool.attributes["gen_ai.tool.call.result"]) == "Paris: 18°C, light rain"


def test_bad_env_value_warns_and_stays_off(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "maybe")
    spans = instrument()
    assert "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT" in caplog.text
    LocalChatModel().invoke("hi")
    assert "gen_ai.input.messages" not in spans.one("chat chatter-local-1").attributes


def test_huge_payload_is_truncated_as_valid_json(instrument: Any) -> None:
    spans = instrument(capture_content=True, max_content_length=2000)
    huge = "word " * 50_000
    LocalChatModel().invoke([HumanMessage(huge), HumanMessage("short"), HumanMessage(huge)])
    a = spans.one("chat chatter-local-1").attributes
    for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
        text = a[key]
        assert len(text) <= 2000
        data = json.loads(text)  # still JSON, still the message shape
        assert isinstance(data, list) and data[0]["role"] in {"user", "assistant"}
    inp = json.loads(a["gen_ai.input.messages"])
    assert [m["role"] for m in inp] == ["user", "user", "user"]
    assert inp[1]["parts"][0]["content"] == "short"
    assert "truncated" in inp[0]["parts"][0]["content"]


def test_many_messages_are_cut_from_the_end(instrument: Any) -> None:
    spans = instrument(capture_content=True, max_content_length=500)
    LocalChatModel().invoke([HumanMessage(f"m{i}") for i in range(400)])
    text = spans.one("chat chatter-local-1").attributes["gen_ai.input.messages"]
    data = json.loads(text)
    assert len(text) <= 500
    assert data[0]["parts"][0]["content"] == "m0"
    assert data[-1]["truncated_items"] == 400 - (len(data) - 1)


def test_redaction_hook(instrument: Any) -> None:
    seen: list[str] = []

    def redact(kind: str, value: Any) -> Any:
        seen.append(kind)
        return json.loads(json.dumps(value).replace("Paris", "[CITY]"))

    spans = instrument(capture_content=True, redact=redact)
    build_chat_graph().invoke(Q)
    for s in spans.all:
        for key in CONTENT_KEYS:
            if key in s.attributes:
                assert "Paris" not in s.attributes[key], (s.name, key)
    assert {"input", "output", "tool.arguments", "tool.result"} <= set(seen)


def test_raising_redactor_drops_content_never_leaks_it(instrument: Any) -> None:
    def redact(kind: str, value: Any) -> Any:
        raise RuntimeError("redactor broken")

    spans = instrument(capture_content=True, redact=redact)
    out = build_chat_graph().invoke(Q)
    assert out["messages"][-1].content.startswith("Here is what I found")
    for s in spans.all:
        for key in CONTENT_KEYS:
            if key in s.attributes:
                assert s.attributes[key] == '"[content dropped: redaction failed]"'


def _logs(instrument: Any, **options: Any) -> tuple[Any, Any]:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    return instrument(logger_provider=provider, **options), exporter


def _details(exporter: Any) -> list[Any]:
    return [d.log_record for d in exporter.get_finished_logs()
            if d.log_record.event_name == "gen_ai.client.inference.operation.details"]  # fmt: skip


@pytest.mark.parametrize("mode", ["EVENT_ONLY", "SPAN_AND_EVENT"])
def test_content_as_events_the_util_genai_way(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """EVENT_ONLY: no content on any span, and one ``gen_ai.client.inference.operation.details``
    event per LLM call, in its span's context, with the call's attributes and its messages as
    structures; SPAN_AND_EVENT: both."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", mode)
    spans, logs = _logs(instrument)
    build_chat_graph().invoke(Q)
    chats = sorted(spans.named("chat chatter-local-1"), key=lambda s: s.start_time)
    events = _details(logs)
    assert len(events) == len(chats) == 2
    events.sort(key=lambda e: e.observed_timestamp or 0)
    for span, event in zip(chats, events, strict=True):
        assert event.trace_id == span.context.trace_id
        assert event.span_id == span.context.span_id
        a = dict(event.attributes or {})
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == span.attributes["gen_ai.provider.name"]
        assert a["gen_ai.request.model"] == "chatter-local-1"
        assert a["gen_ai.usage.input_tokens"] == span.attributes["gen_ai.usage.input_tokens"]
    first = dict(events[0].attributes or {})
    assert first["gen_ai.input.messages"][0]["role"] == "user"
    assert first["gen_ai.output.messages"][0]["parts"][0]["name"] == "get_weather"
    on_spans = any(k in s.attributes for s in spans.all for k in CONTENT_KEYS)
    assert on_spans is (mode == "SPAN_AND_EVENT")


def test_content_events_are_redacted_and_off_unless_asked(
    instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def redact(kind: str, value: Any) -> Any:
        return "[redacted]"

    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "event_only")
    spans, logs = _logs(instrument, redact=redact)
    LocalChatModel().invoke("my card is 4111 1111 1111 1111")
    (event,) = _details(logs)
    a = dict(event.attributes or {})
    assert a["gen_ai.input.messages"] == "[redacted]" == a["gen_ai.output.messages"]
    assert "4111" not in json.dumps(a, default=str)
    assert "gen_ai.input.messages" not in spans.one("chat chatter-local-1").attributes


def test_no_events_by_default(instrument: Any) -> None:
    _, logs = _logs(instrument)
    LocalChatModel().invoke("hi")
    assert _details(logs) == []


def test_emit_event_false_turns_events_off(
    instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "EVENT_ONLY")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT", "false")
    spans, logs = _logs(instrument)
    LocalChatModel().invoke("hi")
    assert _details(logs) == []
    assert "gen_ai.input.messages" not in spans.one("chat chatter-local-1").attributes
