"""Live analytics from LLM call records, and the GenAI client metrics.

``AnalyticsSpanProcessor`` takes the record of every LLM call of ours (sampled or not) and

* records the GenAI client metrics (``sinks.metrics``);
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

from chatter_otel.attributes import COST_METRIC
from chatter_otel.instrumentation.records import EmbeddingsRecord, LLMCallRecord
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.sinks.metrics import GenAIMetrics
from chatter_otel.sinks.worker import SinkWorker

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.records import Record

__all__ = ["COST_METRIC", "AnalyticsSpanProcessor", "LLMCompletion", "LiveAnalytics"]

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
        self.analytics = analytics
        self.record_completion = record_completion
        self.worker = SinkWorker("analytics") if record_completion is not None else None
        self.metrics = GenAIMetrics(meter_provider)

    def ended(self, rec: Record) -> None:
        if not isinstance(rec, LLMCallRecord | EmbeddingsRecord):
            return
        error = (rec.error_type or "_OTHER") if rec.failed else None
        self.metrics.record(rec, error)
        if isinstance(rec, EmbeddingsRecord):  # metrics only: not a chat completion
            return
        cost = float(rec.cost) if rec.cost is not None else None
        if self.analytics is None and self.worker is None:
            return
        ids = rec.ids
        completion = LLMCompletion(
            timestamp=rec.end_ns / 1e9, provider=rec.provider, model=rec.model,
            user_id=ids.user_id, conversation_id=ids.conversation_id,
            correlation_id=ids.correlation_id, trace_id=rec.trace_id,
            input_tokens=rec.input_tokens, output_tokens=rec.output_tokens, cost=cost,
            duration_s=rec.duration_s, time_to_first_chunk_s=rec.time_to_first_chunk_s,
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
