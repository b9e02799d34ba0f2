"""Live analytics from LLM spans, and the GenAI client metrics.

``AnalyticsSpanProcessor`` sees every ``chat`` span end and

* records the GenAI metrics through the OpenTelemetry metrics API: ``gen_ai.client.token.usage``
  (by ``gen_ai.token.type``), ``gen_ai.client.operation.duration`` and
  ``gen_ai.client.operation.time_to_first_chunk``, with the conventions' bucket boundaries and
  attributes (``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``error.type``), and a cost counter ``chatter.gen_ai.cost`` (USD);
* adds the call to ``LiveAnalytics``: in-memory aggregates over a sliding window by model,
  provider, user and conversation (calls, errors, tokens, cost, latency and time-to-first-chunk
  p50/p95/p99), read with ``snapshot()``;
* hands an ``LLMCompletion`` to the app's own push hook (``record_completion``), off-thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
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
from chatter_otel.instrumentation.records import LLMCallRecord
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.sinks.worker import SinkWorker
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.records import Record

__all__ = ["COST_METRIC", "AnalyticsSpanProcessor", "LLMCompletion", "LiveAnalytics"]

# The GenAI conventions' advised bucket boundaries.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864]  # fmt: skip
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92]  # fmt: skip
DIMENSIONS = ("model", "provider", "user", "conversation")


@dataclass(frozen=True)
class LLMCompletion:
    """One finished LLM call, as analytics and the push hook see it."""

    timestamp: float
    provider: str | None
    model: str | None
    user_id: str | None
    conversation_id: str | None
    correlation_id: str | None
    trace_id: str
    input_tokens: int | None
    output_tokens: int | None
    cost: float | None
    duration_s: float
    time_to_first_chunk_s: float | None
    error_type: str | None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LiveAnalytics:
    """Sliding-window aggregates; bounded in keys per dimension and samples per key."""

    def __init__(
        self, window_s: float = 300.0, max_keys: int = 1_000, max_samples: int = 10_000
    ) -> None:
        self.window_s = window_s
        self._max_keys = max_keys
        self._max_samples = max_samples
        self._series: dict[str, OrderedDict[str, deque[LLMCompletion]]] = {
            d: OrderedDict() for d in DIMENSIONS
        }
        self._lock = threading.Lock()

    def record(self, c: LLMCompletion) -> None:
        keys = {"model": c.model, "provider": c.provider, "user": c.user_id,
                "conversation": c.conversation_id}  # fmt: skip
        with self._lock:
            for dim, key in keys.items():
                if not key:
                    continue
                series = self._series[dim]
                samples = series.get(key)
                if samples is None:
                    if len(series) >= self._max_keys:
                        series.popitem(last=False)  # the least recently active key
                    samples = series[key] = deque(maxlen=self._max_samples)
                else:
                    series.move_to_end(key)
                samples.append(c)

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Per dimension and key, over the window: calls, errors, tokens, cost, percentiles."""
        cutoff = (now if now is not None else time.time()) - self.window_s
        out: dict[str, dict[str, dict[str, Any]]] = {}
        with self._lock:
            for dim, series in self._series.items():
                out[dim] = {}
                for key, samples in list(series.items()):
                    while samples and samples[0].timestamp < cutoff:
                        samples.popleft()
                    if not samples:
                        del series[key]
                        continue
                    out[dim][key] = self._aggregate(list(samples))
        return out

    @staticmethod
    def _aggregate(samples: list[LLMCompletion]) -> dict[str, Any]:
        lat = [s.duration_s * 1000 for s in samples]
        ttfc = [s.time_to_first_chunk_s * 1000 for s in samples if s.time_to_first_chunk_s]
        costs = [s.cost for s in samples if s.cost is not None]
        return {
            "calls": len(samples),
            "errors": sum(1 for s in samples if s.error_type),
            "input_tokens": sum(s.input_tokens or 0 for s in samples),
            "output_tokens": sum(s.output_tokens or 0 for s in samples),
            "cost": sum(costs) if costs else None,
            "latency_ms": {"p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95), "p99": _pct(lat, 0.99)},
            "ttfc_ms": {"p50": _pct(ttfc, 0.5), "p95": _pct(ttfc, 0.95), "p99": _pct(ttfc, 0.99)},
        }


class AnalyticsSpanProcessor(RecordSpanProcessor):
    """``chat`` spans -> GenAI metrics, ``LiveAnalytics`` and the app's push hook."""

    def __init__(
        self,
        analytics: LiveAnalytics | None,
        meter_provider: MeterProvider | None = None,
        record_completion: Callable[[LLMCompletion], Any] | None = None,
    ) -> None:
        from opentelemetry import metrics

        self.analytics = analytics
        self.record_completion = record_completion
        self.worker = SinkWorker("analytics") if record_completion is not None else None
        meter = metrics.get_meter(
            "chatter_otel", __version__, meter_provider, schema_url=SCHEMA_URL
        )
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

    def ended(self, rec: Record) -> None:
        if not isinstance(rec, LLMCallRecord):
            return
        error = (rec.error_type or "_OTHER") if rec.failed else None
        attrs: dict[str, Any] = {GEN_AI_OPERATION_NAME: rec.operation}
        if rec.provider:
            attrs[GEN_AI_PROVIDER_NAME] = rec.provider
        if rec.request_model:
            attrs[GEN_AI_REQUEST_MODEL] = rec.request_model
        if rec.response_model:
            attrs[GEN_AI_RESPONSE_MODEL] = rec.response_model
        if error:
            attrs[ERROR_TYPE] = error
        duration = rec.duration_s
        self._duration.record(duration, attrs)
        tin, tout = rec.input_tokens, rec.output_tokens
        if tin is not None:
            self._tokens.record(tin, {**attrs, GEN_AI_TOKEN_TYPE: GenAiTokenTypeValues.INPUT.value})
        if tout is not None:
            out_type = GenAiTokenTypeValues.COMPLETION.value  # "output"
            self._tokens.record(tout, {**attrs, GEN_AI_TOKEN_TYPE: out_type})
        ttfc = rec.time_to_first_chunk_s
        if ttfc is not None:
            self._ttfc.record(ttfc, attrs)
        cost = float(rec.cost) if rec.cost is not None else None
        if cost is not None:
            self._cost.add(cost, attrs)
        if self.analytics is None and self.worker is None:
            return
        ids = rec.ids
        completion = LLMCompletion(
            timestamp=rec.end_ns / 1e9, provider=rec.provider, model=rec.model,
            user_id=ids.user_id, conversation_id=ids.conversation_id,
            correlation_id=ids.correlation_id, trace_id=rec.trace_id, input_tokens=tin,
            output_tokens=tout, cost=cost, duration_s=duration, time_to_first_chunk_s=ttfc,
            error_type=error,
        )  # fmt: skip
        if self.analytics is not None:
            self.analytics.record(completion)
        if self.worker is not None and self.record_completion is not None:
            self.worker.call(self.record_completion, completion)

    def repoint(  # type: ignore[override]
        self, analytics: LiveAnalytics | None = None,
        record_completion: Callable[..., Any] | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:  # fmt: skip
        """New sinks from a new ``configure`` on the same provider (the meters stay)."""
        self.detach()
        self.analytics = analytics
        self.record_completion = record_completion
        self.worker = SinkWorker("analytics") if record_completion is not None else None

    def detach(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.analytics = None
        self.record_completion = None
        self.worker = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.worker.flush(timeout_millis / 1000) if self.worker is not None else True
