"""The GenAI client metrics, recorded from LLM call records.

``gen_ai.client.token.usage`` (by ``gen_ai.token.type``), ``gen_ai.client.operation.duration``
and ``gen_ai.client.operation.time_to_first_chunk``, with the conventions' advised bucket
boundaries and attributes (``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``error.type``), and the counter
``chatter.gen_ai.cost`` (USD) where a call could be priced. Every call is recorded, sampled or
not: the records come from every span of ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_TOKEN_TYPE,
    GenAiTokenTypeValues,
)
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_CLIENT_OPERATION_DURATION,
    GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
    GEN_AI_CLIENT_TOKEN_USAGE,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE

from chatter_otel.attributes import COST_METRIC
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.records import EmbeddingsRecord, LLMCallRecord

__all__ = ["DURATION_BUCKETS", "TOKEN_BUCKETS", "GenAIMetrics"]

# The GenAI conventions' advised bucket boundaries.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]  # fmt: skip
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]  # fmt: skip
_INPUT = GenAiTokenTypeValues.INPUT.value
_OUTPUT = GenAiTokenTypeValues.COMPLETION.value  # "output"


class GenAIMetrics:
    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        meter = our_meter(meter_provider)
        self._tokens = meter.create_histogram(
            GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip
        self._duration = meter.create_histogram(
            GEN_AI_CLIENT_OPERATION_DURATION, unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._ttfc = meter.create_histogram(
            GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._cost = meter.create_counter(
            COST_METRIC, unit="USD", description="Cost of GenAI calls, where it could be priced."
        )

    def record(self, rec: LLMCallRecord | EmbeddingsRecord, error: str | None) -> None:
        attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: rec.operation}
        if rec.provider:
            attrs[GEN_AI_PROVIDER_NAME] = rec.provider
        if rec.request_model:
            attrs[GEN_AI_REQUEST_MODEL] = rec.request_model
        if rec.response_model:
            attrs[GEN_AI_RESPONSE_MODEL] = rec.response_model
        if error:
            attrs[ERROR_TYPE] = error
        self._duration.record(rec.duration_s, attrs)
        if rec.input_tokens is not None:
            self._tokens.record(rec.input_tokens, {**attrs, GEN_AI_TOKEN_TYPE: _INPUT})
        if rec.output_tokens is not None:
            self._tokens.record(rec.output_tokens, {**attrs, GEN_AI_TOKEN_TYPE: _OUTPUT})
        if rec.time_to_first_chunk_s is not None:
            self._ttfc.record(rec.time_to_first_chunk_s, attrs)
        if rec.cost is not None:
            self._cost.add(float(rec.cost), attrs)
