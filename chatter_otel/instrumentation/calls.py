"""Invocations of LLM calls and tool calls (see ``invocations`` for the pattern)."""

from __future__ import annotations

import json
import time
from array import array
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MAX_TOKENS,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_REQUEST_STREAM,
    GEN_AI_REQUEST_TEMPERATURE,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_ID,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    GEN_AI_TOOL_CALL_ARGUMENTS,
    GEN_AI_TOOL_CALL_ID,
    GEN_AI_TOOL_CALL_RESULT,
    GEN_AI_TOOL_DESCRIPTION,
    GEN_AI_TOOL_NAME,
    GEN_AI_TOOL_TYPE,
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    GenAiOperationNameValues,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import SpanKind

from chatter_otel._safety import internal_error, warn_once
from chatter_otel.attributes import (
    CHATTER_USAGE_ESTIMATED,
    CHATTER_USAGE_ESTIMATOR,
    CHATTER_USAGE_MISSING,
    CHATTER_USAGE_TOTAL_TOKENS,
    GEN_AI_USAGE_COST_AMOUNT,
    GEN_AI_USAGE_COST_CURRENCY,
    GEN_AI_USAGE_COST_PRICE_TABLE,
    GEN_AI_USAGE_COST_SOURCE,
)
from chatter_otel.instrumentation import content as _content
from chatter_otel.instrumentation import records as r
from chatter_otel.instrumentation.estimate import estimate
from chatter_otel.instrumentation.invocations import Invocation
from chatter_otel.instrumentation.usage import ResponseInfo, TokenUsage, extract_response

INFERENCE_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
# Chunk gaps kept per streamed call for the time-per-chunk metric (8 bytes each): a longer
# stream's later gaps are not recorded (its duration and first chunk still are).
MAX_CHUNK_GAPS = 16_384

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.trace import Tracer

    from chatter_otel.instrumentation.cost import Cost, Pricer
    from chatter_otel.instrumentation.runs import RunIds, WorkflowRun
    from chatter_otel.instrumentation.settings import Settings

_OP_TOOL = GenAiOperationNameValues.EXECUTE_TOOL.value
_MAX_DESC_LEN = 256


class LLMInvocation(Invocation):
    __slots__ = ("budget", "chunk_gaps", "event_inputs", "events", "first_chunk_ns", "inputs",
                 "last_chunk_ns", "operation", "provider", "provider_data", "request_model",
                 "streaming")  # fmt: skip

    def __init__(
        self,
        run_id: Any,
        ids: RunIds,
        parent: Invocation | None,
        workflow: WorkflowRun | None,
        tracer: Tracer,
        *,
        operation: str,
        provider: str | None,
        model: str | None,
        streaming: bool,
        metadata: Mapping[str, Any],
        settings: Settings,
        inputs: list[Any],
        events: Any = None,
        budget: Any = None,
    ) -> None:
        super().__init__(run_id, ids, parent, workflow, settings)
        self.budget = budget  # the app's limits, when it set any (instrumentation/budgets.py)
        self.events = events  # the Logs API logger content events go to, when they are on
        self.event_inputs: str | None = None
        self.operation, self.provider, self.request_model = operation, provider, model
        self.streaming = streaming
        # Kept only to estimate usage the provider does not report (opt-in); the app holds
        # these messages for the call anyway.
        self.inputs = inputs if settings.estimator is not None else None
        # What a util-genai provider instrumentation saw of the call (provider_calls.py).
        self.provider_data: Any = None
        self.first_chunk_ns: int | None = None
        self.last_chunk_ns = 0
        self.chunk_gaps: array[float] | None = None  # between chunks after the first, seconds
        try:  # given at the start (one call into the SDK; samplers and on_start see them)
            attrs = self._start_attributes(metadata, settings, inputs)
        except Exception:
            internal_error("LLMInvocation.start")
            attrs = {}
        self._open(tracer, f"{operation} {model}" if model else operation, SpanKind.CLIENT, attrs)

    def _start_attributes(
        self, md: Mapping[str, Any], settings: Settings, inputs: list[Any]
    ) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: self.operation, **self.ids.attributes(),
            **self.agent_attributes(),
        }  # fmt: skip
        if self.provider:
            attrs[GEN_AI_PROVIDER_NAME] = self.provider
        if self.request_model:
            attrs[GEN_AI_REQUEST_MODEL] = self.request_model
        temperature, max_tokens = md.get("ls_temperature"), md.get("ls_max_tokens")
        if isinstance(temperature, int | float) and not isinstance(temperature, bool):
            attrs[GEN_AI_REQUEST_TEMPERATURE] = float(temperature)
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            attrs[GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        if (settings.capture_content or settings.event_content) and inputs:
            batch = inputs[0]
            value = (
                [_content.message_json(m) for m in batch]
                if isinstance(batch, list)
                else [{"role": "user", "parts": [{"type": "text", "content": str(batch)}]}]
            )
            rendered = _content.render(settings, "input", value)
            if settings.capture_content:
                attrs[GEN_AI_INPUT_MESSAGES] = rendered
            if settings.event_content:
                self.event_inputs = rendered
        return attrs

    def chunk(self) -> None:
        now = time.monotonic_ns()
        if self.first_chunk_ns is None:
            self.first_chunk_ns = now
            self.streaming = True
        else:  # ``gen_ai.client.operation.time_per_output_chunk``: the gap since the last one
            if self.chunk_gaps is None:
                self.chunk_gaps = array("d")
            if len(self.chunk_gaps) < MAX_CHUNK_GAPS:
                self.chunk_gaps.append((now - self.last_chunk_ns) / 1e9)
        self.last_chunk_ns = now

    def stop(
        self, response: Any, error: BaseException | None, pricer: Pricer, settings: Settings
    ) -> None:
        end_ns = time.time_ns()
        record = None
        try:
            info = _extract(response)
            estimator = settings.estimator
            estimated = False
            if estimator is not None and error is None and not info.usage.reported:
                guess = _estimate(estimator, self.inputs, response)
                if guess is not None:
                    info.usage, estimated = guess, True
            cost = _price(pricer, info, self)
            status, etype, message = self._safe_outcome(error)
            u = info.usage
            ttfc = (
                (self.first_chunk_ns - self.start_mono_ns) / 1e9
                if self.first_chunk_ns is not None
                else None
            )
            record = r.LLMCallRecord(
                self.span_id, self.trace_id, self.workflow_id, self.ids, self.start_ns, end_ns,
                status, etype, message, self.operation, self.provider, self.request_model,
                info.model, u.input_tokens, u.output_tokens, u.total_tokens,
                u.cache_read_input_tokens, u.cache_creation_input_tokens,
                u.reasoning_output_tokens, u.reported,
                cost.amount if cost else None, cost.currency if cost else None,
                cost.source if cost else None, info.finish_reasons, self.streaming, ttfc,
                tuple(self.chunk_gaps) if self.chunk_gaps is not None else (),
                cost.table if cost else None, estimated,
                estimator.name if estimated and estimator is not None else None,
            )  # fmt: skip
            if self.streaming and error is None and not u.reported and not estimated:
                _say_stream_usage_missing(record.model)
            if self.span.is_recording():
                self._end_attributes(record, info, response, settings)
            if self.events is not None:
                _content_event(self, record, info, response, settings)
            if self.budget is not None:
                root = self.workflow.root_id if self.workflow is not None else None
                self.budget.spent(record, root, self.span)
        except Exception:
            internal_error("LLMInvocation.stop")
        finally:
            self._close(record, end_ns)
            if record is not None and self.workflow is not None:
                self.workflow.add_llm_call(record)

    def _end_attributes(
        self, rec: r.LLMCallRecord, info: ResponseInfo, response: Any, settings: Settings
    ) -> None:
        try:
            attrs: dict[str, Any] = {GEN_AI_REQUEST_STREAM: rec.streaming}
            if info.model:
                attrs[GEN_AI_RESPONSE_MODEL] = info.model
            if info.response_id:
                attrs[GEN_AI_RESPONSE_ID] = info.response_id
            if info.finish_reasons:
                attrs[GEN_AI_RESPONSE_FINISH_REASONS] = info.finish_reasons
            if rec.time_to_first_chunk_s is not None:
                attrs[GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = rec.time_to_first_chunk_s
            seen = self.provider_data
            if seen is not None and isinstance(seen.server_address, str):
                attrs[SERVER_ADDRESS] = seen.server_address
                if isinstance(seen.server_port, int):
                    attrs[SERVER_PORT] = seen.server_port
            for key, value in (
                (GEN_AI_USAGE_INPUT_TOKENS, rec.input_tokens),
                (GEN_AI_USAGE_OUTPUT_TOKENS, rec.output_tokens),
                (CHATTER_USAGE_TOTAL_TOKENS, rec.total_tokens),
                (GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, rec.cache_read_tokens),
                (GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, rec.cache_creation_tokens),
                (GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, rec.reasoning_tokens),
            ):
                if value is not None:
                    attrs[key] = value
            if rec.usage_estimated:
                attrs[CHATTER_USAGE_ESTIMATED] = True
                attrs[CHATTER_USAGE_ESTIMATOR] = rec.estimator
            elif not rec.usage_reported:
                attrs[CHATTER_USAGE_MISSING] = True
            if rec.cost is not None:
                attrs[GEN_AI_USAGE_COST_AMOUNT] = float(rec.cost)
                attrs[GEN_AI_USAGE_COST_CURRENCY] = rec.cost_currency
                attrs[GEN_AI_USAGE_COST_SOURCE] = rec.cost_source
                if rec.cost_table:
                    attrs[GEN_AI_USAGE_COST_PRICE_TABLE] = rec.cost_table
            self.span.set_attributes(attrs)
        except Exception:
            internal_error("LLMInvocation.attributes")
        if settings.capture_content and response is not None:
            try:
                out = _output_messages(response)
                if out:
                    self.span.set_attribute(
                        GEN_AI_OUTPUT_MESSAGES, _content.render(settings, "output", out)
                    )
            except Exception:
                internal_error("LLMInvocation.content")


def _content_event(inv: LLMInvocation, rec: r.LLMCallRecord, info: ResponseInfo,
                   response: Any, settings: Settings) -> None:  # fmt: skip
    """``gen_ai.client.inference.operation.details``, as opentelemetry-util-genai emits it: the
    call's attributes and (where content goes to events) its messages, truncated and redacted
    as on spans, structured rather than a JSON string; in the call span's context."""
    from opentelemetry._logs import LogRecord

    attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: rec.operation}
    for key, value in ((GEN_AI_PROVIDER_NAME, rec.provider),
                       (GEN_AI_REQUEST_MODEL, rec.request_model),
                       (GEN_AI_RESPONSE_MODEL, info.model), (GEN_AI_RESPONSE_ID, info.response_id),
                       (GEN_AI_USAGE_INPUT_TOKENS, rec.input_tokens),
                       (GEN_AI_USAGE_OUTPUT_TOKENS, rec.output_tokens),
                       (ERROR_TYPE, rec.error_type)):  # fmt: skip
        if value is not None:
            attrs[key] = value
    if info.finish_reasons:
        attrs[GEN_AI_RESPONSE_FINISH_REASONS] = list(info.finish_reasons)
    if settings.event_content:
        if inv.event_inputs is not None:
            attrs[GEN_AI_INPUT_MESSAGES] = json.loads(inv.event_inputs)
        out = _output_messages(response) if response is not None else None
        if out:
            attrs[GEN_AI_OUTPUT_MESSAGES] = json.loads(_content.render(settings, "output", out))
    inv.events.emit(LogRecord(event_name=INFERENCE_DETAILS_EVENT, attributes=attrs,
                              context=trace.set_span_in_context(inv.span)))  # fmt: skip


def _say_stream_usage_missing(model: str | None) -> None:
    """One line a minute per model: a streamed call came back without usage, and the fix."""
    fix = (
        "ChatOpenAI(stream_usage=True), or configure(stream_usage=True) / "
        "CHATTER_OTEL_STREAM_USAGE=true to ask every OpenAI-compatible model"
    )
    warn_once(f"usage:stream:{(model or '?')[:64]}", "chatter-otel: a streamed call to %s "
              "reported no token usage (recorded as missing, never 0); to get it: %s",
              model or "an unknown model", fix)  # fmt: skip


def _extract(response: Any) -> ResponseInfo:
    try:
        return extract_response(response)
    except Exception:
        internal_error("extract_response")
        return ResponseInfo(usage=TokenUsage())


def _estimate(estimator: Any, inputs: list[Any] | None, response: Any) -> TokenUsage | None:
    try:
        return estimate(estimator, inputs, response)
    except Exception:
        internal_error("estimate")
        return None


def _price(pricer: Pricer, info: ResponseInfo, inv: LLMInvocation) -> Cost | None:
    """The call's cost; a pricer that fails leaves it absent (never 0) and the call counted."""
    try:
        return pricer.cost(info.usage, (info.model, inv.request_model), inv.provider)
    except Exception:
        internal_error("Pricer.cost")
        return None


def _output_messages(response: Any) -> list[dict[str, Any]]:
    out = []
    for gen in (getattr(response, "generations", None) or [[]])[0]:
        msg = getattr(gen, "message", None)
        item = (
            _content.message_json(msg)
            if msg is not None
            else {"role": "assistant", "parts": [{"type": "text", "content": gen.text}]}
        )
        reason = (getattr(msg, "response_metadata", None) or {}).get("finish_reason")
        if reason:
            item["finish_reason"] = reason
        out.append(item)
    return out


class ToolInvocation(Invocation):
    __slots__ = ("call_id", "name")

    def __init__(
        self,
        run_id: Any,
        ids: RunIds,
        parent: Invocation | None,
        workflow: WorkflowRun | None,
        tracer: Tracer,
        *,
        name: str,
        call_id: str | None,
        description: str | None,
        arguments: Any,
        settings: Settings,
    ) -> None:
        super().__init__(run_id, ids, parent, workflow, settings)
        self.name, self.call_id = name, call_id
        attrs: dict[str, Any] = {}
        try:  # given at the start: one call into the SDK
            attrs = {
                GEN_AI_OPERATION_NAME: _OP_TOOL,
                GEN_AI_TOOL_NAME: name,
                GEN_AI_TOOL_TYPE: "function",
                **ids.attributes(),
                **self.agent_attributes(),
            }
            if call_id:
                attrs[GEN_AI_TOOL_CALL_ID] = call_id
            if description:
                attrs[GEN_AI_TOOL_DESCRIPTION] = description[:_MAX_DESC_LEN]
            if settings.capture_content:
                attrs[GEN_AI_TOOL_CALL_ARGUMENTS] = _content.render(
                    settings, "tool.arguments", arguments
                )
        except Exception:
            internal_error("ToolInvocation.start")
        self._open(tracer, f"execute_tool {name}", SpanKind.INTERNAL, attrs)

    def stop(self, output: Any, error: BaseException | None, settings: Settings) -> None:
        end_ns = time.time_ns()
        record = None
        try:
            if error is None and settings.capture_content and self.span.is_recording():
                try:
                    result = getattr(output, "content", output)
                    self.span.set_attribute(
                        GEN_AI_TOOL_CALL_RESULT, _content.render(settings, "tool.result", result)
                    )
                except Exception:
                    internal_error("ToolInvocation.content")
            status, etype, message = self._safe_outcome(error)
            record = r.ToolCallRecord(
                self.span_id, self.trace_id, self.workflow_id, self.ids, self.start_ns, end_ns,
                status, etype, message, self.name, self.call_id,
            )  # fmt: skip
        except Exception:
            internal_error("ToolInvocation.stop")
        finally:
            self._close(record, end_ns)
            if self.workflow is not None:
                self.workflow.add_tool_call()
