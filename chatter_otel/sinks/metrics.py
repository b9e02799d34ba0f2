"""The GenAI metrics, recorded from the records of every span of ours (sampled or not).

LLM calls: ``gen_ai.client.token.usage`` (by ``gen_ai.token.type``),
``gen_ai.client.operation.duration``, ``gen_ai.client.operation.time_to_first_chunk`` and
``gen_ai.client.operation.time_per_output_chunk`` (each gap between a stream's chunks after the
first), with the conventions' advised bucket boundaries and attributes
(``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``error.type``), and the counter ``chatter.gen_ai.cost`` (USD) where
a call could be priced. Runs and tools, as ``opentelemetry-util-genai`` names and buckets them:
``gen_ai.invoke_workflow.duration`` (``gen_ai.workflow.name``), ``gen_ai.invoke_agent.duration``
(``gen_ai.agent.name``) and ``gen_ai.execute_tool.duration`` (``gen_ai.tool.name``), with
``gen_ai.operation.name`` and ``error.type``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_AGENT_NAME,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_TOKEN_TYPE,
    GEN_AI_TOOL_NAME,
    GEN_AI_WORKFLOW_NAME,
    GenAiTokenTypeValues,
)
from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
    GEN_AI_CLIENT_OPERATION_DURATION,
    GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
    GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
    GEN_AI_CLIENT_TOKEN_USAGE,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE

from chatter_otel.attributes import (
    CHATTER_USAGE_ESTIMATED,
    COST_METRIC,
    EXECUTE_TOOL_DURATION_METRIC,
    INVOKE_AGENT_DURATION_METRIC,
    INVOKE_WORKFLOW_DURATION_METRIC,
)
from chatter_otel.instrumentation.records import WorkflowRecord
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.records import (
        EmbeddingsRecord,
        LLMCallRecord,
        ToolCallRecord,
    )

__all__ = ["AGENT_BUCKETS", "DURATION_BUCKETS", "TOKEN_BUCKETS", "WORKFLOW_BUCKETS",
           "GenAIMetrics"]  # fmt: skip

# The GenAI conventions' advised bucket boundaries.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]  # fmt: skip
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]  # fmt: skip
# opentelemetry-util-genai's: runs last seconds to hours, agents up to minutes.
WORKFLOW_BUCKETS = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0]
AGENT_BUCKETS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 102.4, 204.8, 409.6]
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

        def seconds(name: str, description: str, buckets: list[float]) -> Any:
            return meter.create_histogram(name, unit="s", description=description,
                                          explicit_bucket_boundaries_advisory=buckets)  # fmt: skip

        self._duration = seconds(GEN_AI_CLIENT_OPERATION_DURATION, "GenAI operation duration.",
                                 DURATION_BUCKETS)  # fmt: skip
        self._ttfc = seconds(GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK,
                             "Time to receive the first chunk of a streamed response.",
                             DURATION_BUCKETS)  # fmt: skip
        self._chunk = seconds(GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK,
                              "Time between a streamed response's chunks, after the first.",
                              DURATION_BUCKETS)  # fmt: skip
        self._cost = meter.create_counter(
            COST_METRIC, unit="USD", description="Cost of GenAI calls, where it could be priced."
        )
        self._workflow = seconds(INVOKE_WORKFLOW_DURATION_METRIC,
                                 "Measures the duration of a workflow execution.",
                                 WORKFLOW_BUCKETS)  # fmt: skip
        self._agent = seconds(INVOKE_AGENT_DURATION_METRIC,
                              "Measures the duration of an in-process agent invocation.",
                              AGENT_BUCKETS)  # fmt: skip
        self._tool = seconds(
            EXECUTE_TOOL_DURATION_METRIC,
            "Measures the duration of a tool execution.",
            DURATION_BUCKETS,
        )

    def record_run(self, rec: WorkflowRecord | ToolCallRecord, error: str | None) -> None:
        """A workflow, an agent's run or a tool call, as util-genai records them."""
        attrs: dict[str, Any]
        if not isinstance(rec, WorkflowRecord):  # a tool call
            attrs = {GEN_AI_OPERATION_NAME: "execute_tool", GEN_AI_TOOL_NAME: rec.name}
            histogram = self._tool
        elif rec.agent:
            attrs = {GEN_AI_OPERATION_NAME: "invoke_agent", GEN_AI_AGENT_NAME: rec.name}
            histogram = self._agent
        else:
            attrs = {GEN_AI_OPERATION_NAME: "invoke_workflow", GEN_AI_WORKFLOW_NAME: rec.name}
            histogram = self._workflow
        if error:
            attrs[ERROR_TYPE] = error
        histogram.record(rec.duration_s, attrs)

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
        if getattr(rec, "usage_estimated", False):  # never summed silently with measured ones
            attrs = {**attrs, CHATTER_USAGE_ESTIMATED: True}
        if rec.input_tokens is not None:
            self._tokens.record(rec.input_tokens, {**attrs, GEN_AI_TOKEN_TYPE: _INPUT})
        if rec.output_tokens is not None:
            self._tokens.record(rec.output_tokens, {**attrs, GEN_AI_TOKEN_TYPE: _OUTPUT})
        if rec.time_to_first_chunk_s is not None:
            self._ttfc.record(rec.time_to_first_chunk_s, attrs)
        for gap in rec.chunk_gaps_s:
            self._chunk.record(gap, attrs)
        if rec.cost is not None:
            self._cost.add(float(rec.cost), attrs)
