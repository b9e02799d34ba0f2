"""util-genai's framework-over-provider protocol (opentelemetry-util-genai 1.2 and later).

Not collected by ``make test``'s own run: its venv pins util-genai 1.1b0, the newest that
openai-v2 2.4b0 imports. ``scripts/test-wheel.sh`` runs this file in the wheel's venv with the
newest util-genai, where a provider instrumentation built on it (here: the openai client's
``create`` wrapped exactly as openai-v2's util-genai path does, through a real
``TelemetryHandler``) finds our inference in the context: it records no span, metric or event
of its own, and the server address it saw lands on our chat span.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util.genai.handler import TelemetryHandler
from wrapt import wrap_function_wrapper

from chatter_otel import LangGraphInstrumentor

if TYPE_CHECKING:
    from collections.abc import Iterator


class Provider:
    """A provider instrumentation on util-genai: ``Completions.create`` as one inference."""

    def __init__(self, handler: TelemetryHandler, port: int) -> None:
        self.handler, self.port = handler, port

    def __call__(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        inv = self.handler.inference("openai", request_model=kwargs.get("model"),
                                     server_address="127.0.0.1", server_port=self.port)  # fmt: skip
        try:
            result = wrapped(*args, **kwargs)
        except Exception as exc:
            inv.fail(exc)
            raise
        parsed = result.parse() if hasattr(result, "parse") else result
        inv.input_tokens = parsed.usage.prompt_tokens
        inv.output_tokens = parsed.usage.completion_tokens
        inv.stop()
        return result


@pytest.fixture
def setup(openai_server: Any) -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    meters = MeterProvider(metric_readers=[reader])
    handler = TelemetryHandler(tracer_provider=provider, meter_provider=meters)
    port = int(openai_server.url.rsplit(":", 1)[1].split("/")[0])
    wrap_function_wrapper(openai.resources.chat.completions.Completions, "create",
                          Provider(handler, port))  # fmt: skip
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=provider, prices={})
    try:
        yield exporter, reader
    finally:
        inst.uninstrument()
        from opentelemetry.instrumentation.utils import unwrap

        unwrap(openai.resources.chat.completions.Completions, "create")


def _metrics(reader: InMemoryMetricReader) -> list[str]:
    data = reader.get_metrics_data()
    return [m.name for rm in (data.resource_metrics if data else ())
            for sm in rm.scope_metrics for m in sm.metrics]  # fmt: skip


def test_the_provider_alone_records_its_call(setup: Any, openai_server: Any) -> None:
    exporter, reader = setup
    client = openai.OpenAI(base_url=openai_server.url, api_key="k", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user",
                                                                   "content": "hi"}])  # fmt: skip
    (span,) = exporter.get_finished_spans()
    assert span.instrumentation_scope.name != "chatter_otel"
    assert "gen_ai.client.token.usage" in _metrics(reader)


def test_under_our_chat_call_the_provider_records_nothing(setup: Any, openai_server: Any) -> None:
    exporter, reader = setup
    model = ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.url, api_key="k",
                       max_retries=0)  # fmt: skip
    model.invoke("hi")
    (span,) = exporter.get_finished_spans()
    assert span.instrumentation_scope.name == "chatter_otel"
    assert span.name == "chat gpt-4o-mini"
    assert span.attributes["gen_ai.usage.input_tokens"] == 23
    assert span.attributes["server.address"] == "127.0.0.1"
    assert span.attributes["server.port"] == int(openai_server.url.rsplit(":", 1)[1].split("/")[0])
    assert _metrics(reader) == []
