"""Our spans are always recorded: accounting is not sampling.

The span processors (ledger, monitoring, events, analytics, metrics) are fed from the records of
our spans, so they must see every one of them, whatever the app's sampler decides. Our tracer's
sampler is wrapped: where the app's sampler says ``DROP`` for one of our spans, it becomes
``RECORD_ONLY`` (recorded, processors run, not sampled: ``BatchSpanProcessor`` and every
exporter skip it). The app's own spans keep the app's decision: only our tracer is wrapped, and
a ``ParentBased`` sampler still sees our unsampled spans as unsampled parents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import get_current_span

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.context import Context
    from opentelemetry.trace import Link, SpanKind, TraceState
    from opentelemetry.util.types import Attributes

__all__ = ["AlwaysRecord", "always_record"]


class AlwaysRecord(Sampler):
    """``inner``'s decision, with ``DROP`` raised to ``RECORD_ONLY``."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(  # noqa: PLR0917 - the SDK's Sampler signature
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        result = self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if result.decision is not Decision.DROP:
            return result
        parent = get_current_span(parent_context).get_span_context()
        state = parent.trace_state if parent.is_valid else result.trace_state
        return SamplingResult(Decision.RECORD_ONLY, attributes, state)

    def get_description(self) -> str:
        return f"AlwaysRecord{{{self.inner.get_description()}}}"


def always_record(tracer: Any) -> Any:
    """Wrap the sampler of ``tracer`` (an SDK tracer of ours) once; other tracers (a no-op or
    proxy tracer: no SDK, nothing to feed) are returned unchanged."""
    if isinstance(tracer, SdkTracer) and not isinstance(tracer.sampler, AlwaysRecord):
        tracer.sampler = AlwaysRecord(tracer.sampler)
    return tracer
