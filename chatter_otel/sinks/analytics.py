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

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel.attributes import COST_METRIC
from chatter_otel.instrumentation.records import (
    EmbeddingsRecord,
    LLMCallRecord,
    ToolCallRecord,
    WorkflowRecord,
)
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.sinks.metrics import GenAIMetrics
from chatter_otel.sinks.worker import SinkWorker

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.instrumentation.records import Record

__all__ = ["COST_METRIC", "AnalyticsSpanProcessor", "LLMCompletion", "LiveAnalytics"]

DIMENSIONS = ("model", "provider", "user", "conversation")


@dataclass(frozen=True, slots=True)
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
    """Sliding-window aggregates, bounded on write (never by a reader's visit).

    Each ``record`` evicts what the window has passed: the touched keys' samples older than
    ``window_s``, and (at most once a second) the keys whose newest sample is older, found from
    the least recently active end, so the work is proportional to what goes. Counts bound it
    too: at most ``max_keys`` keys and ``max_samples`` samples per key, and ``max_total``
    samples per dimension (the least recently active key gives up its oldest first). Memory is
    at most about ``max_total`` samples however long the process runs and whether or not
    ``snapshot()`` is ever called; ``evicted`` counts samples let go by a count bound before
    the window passed them (percentiles then cover the newest ``max_total`` calls).
    """

    def __init__(
        self, window_s: float = 300.0, max_keys: int = 1_000, max_samples: int = 10_000,
        max_total: int = 100_000,
    ) -> None:  # fmt: skip
        self.window_s = window_s
        self._max_keys = max_keys
        self._max_samples = max_samples
        self._max_total = max_total
        self._series: dict[str, OrderedDict[str, deque[LLMCompletion]]] = {
            d: OrderedDict() for d in DIMENSIONS
        }
        self._totals = dict.fromkeys(DIMENSIONS, 0)
        self._next_sweep = 0.0
        self.evicted = 0
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")

    def record(self, c: LLMCompletion) -> None:
        keys = (("model", c.model), ("provider", c.provider), ("user", c.user_id),
                ("conversation", c.conversation_id))  # fmt: skip
        now = time.time()
        cutoff = now - self.window_s
        with self._lock:
            for dim, key in keys:
                if not key:
                    continue
                series = self._series[dim]
                samples = series.get(key)
                if samples is None:
                    if len(series) >= self._max_keys:  # the least recently active key goes
                        self._drop_key(dim, next(iter(series)), counted=True)
                    samples = series[key] = deque()
                else:
                    series.move_to_end(key)
                    gone = 0
                    while samples and samples[0].timestamp < cutoff:
                        samples.popleft()
                        gone += 1
                    if len(samples) >= self._max_samples:
                        samples.popleft()
                        gone += 1
                        self.evicted += 1
                    self._totals[dim] -= gone
                samples.append(c)
                self._totals[dim] += 1
                if self._totals[dim] > self._max_total:
                    self._trim(dim)
            if now >= self._next_sweep:
                self._next_sweep = now + 1.0
                self._sweep(cutoff)

    def _drop_key(self, dim: str, key: str, *, counted: bool) -> None:
        samples = self._series[dim].pop(key)
        self._totals[dim] -= len(samples)
        if counted:
            self.evicted += len(samples)

    def _trim(self, dim: str) -> None:
        """Over ``max_total``: the oldest samples of the least recently active keys go."""
        series = self._series[dim]
        while self._totals[dim] > self._max_total and series:
            key = next(iter(series))
            samples = series[key]
            samples.popleft()
            self._totals[dim] -= 1
            self.evicted += 1
            if not samples:
                del series[key]

    def _sweep(self, cutoff: float) -> None:
        """Keys whose newest sample the window has passed, from the least recently active."""
        for dim, series in self._series.items():
            while series:
                key = next(iter(series))
                samples = series[key]
                if samples and samples[-1].timestamp >= cutoff:
                    break
                self._drop_key(dim, key, counted=False)

    def size(self) -> int:
        """Samples held, over all dimensions (each call is held once per dimension it has)."""
        with self._lock:
            return sum(self._totals.values())

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
                        self._totals[dim] -= 1
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
        if isinstance(rec, WorkflowRecord | ToolCallRecord):
            self.metrics.record_run(rec, (rec.error_type or "_OTHER") if rec.failed else None)
            return
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
