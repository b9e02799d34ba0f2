"""``Telemetry`` (what ``configure`` set up), the process-wide configuration, and what both
``configure()`` and the zero-code path install: the processors, the meter provider, log ids and
outbound propagation. ``configure()`` itself is in ``chatter_otel.setup``.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel.correlation import ValidatingBaggageSpanProcessor, install_log_record_factory
from chatter_otel.export.metrics import meter_provider_from_env
from chatter_otel.instrumentation.settings import exception_text_captured
from chatter_otel.propagation import filter_outbound_baggage
from chatter_otel.sinks.analytics import AnalyticsSpanProcessor, LiveAnalytics
from chatter_otel.sinks.dispatch import RecordFanout
from chatter_otel.sinks.events import EventBus, EventSpanProcessor
from chatter_otel.sinks.monitoring import MonitoringService, MonitoringSpanProcessor

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from opentelemetry.metrics import MeterProvider

    from chatter_otel.export.store import LocalTraceStore
    from chatter_otel.instrumentation.instrumentor import LangGraphInstrumentor
    from chatter_otel.sinks.fill import AppUsage

__all__ = ["Telemetry", "configure_for_zero_code"]

_log = logging.getLogger("chatter_otel")

_lock = threading.Lock()
_current: Telemetry | None = None
_with_baggage: weakref.WeakSet[TracerProvider] = weakref.WeakSet()
# provider -> the one processor our sinks hang on; weak, so a new provider never inherits a
# dead one's sinks
_fanouts: weakref.WeakKeyDictionary[TracerProvider, RecordFanout] = weakref.WeakKeyDictionary()


class Telemetry:
    """What ``configure`` set up. ``force_flush()`` and ``shutdown()`` are bounded in time.

    ``events`` is the ``EventBus`` receiving lifecycle events, ``monitoring`` the
    MonitoringService the runs are reported to, ``analytics`` the ``LiveAnalytics``; each is the
    built-in one, the object given to ``configure``, or None when switched off.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None,
        *,
        owns_provider: bool,
        exporter_name: str,
        trace_store: LocalTraceStore | None,
        instrumentor: LangGraphInstrumentor | None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.exporter_name = exporter_name
        self.trace_store = trace_store
        self.instrumentor = instrumentor
        self.monitoring: Any = None
        self.events: Any = None
        self.analytics: Any = None
        self.persistence: Any = None
        self.meter_provider: Any = None
        self.forwarder: Any = None
        # set in fill mode: the app's own usage reports checked against the measured ones
        self._app_usage: AppUsage | None = None
        self._owns_meters = False
        self._owns_provider = owns_provider
        self._undo: list[Callable[[], None]] = []

    def force_flush(self, timeout_millis: int = 5_000) -> bool:
        provider = self.tracer_provider
        done = bool(provider.force_flush(timeout_millis)) if provider is not None else True
        if self.forwarder is not None:  # after the processors: their events are in its queue
            done = self.forwarder.flush(timeout_millis / 1000) and done
        return done

    def shutdown(self, timeout_millis: int = 5_000) -> None:
        """Uninstrument, then flush and shut down what was built here, within ``timeout_millis``.

        The SDK's own shutdown can wait far longer on an unreachable collector (its batch
        processor allows 30 s, plus exporter retries); past the bound this returns, logs how
        it left things, and lets the flush go on in a daemon thread that exit will not wait for.
        """
        global _current  # noqa: PLW0603 - the process-wide configuration, like the SDK's
        if self.instrumentor is not None:
            self.instrumentor.uninstrument()
        for undo in reversed(self._undo):
            undo()
        provider = self.tracer_provider
        meters = self.meter_provider if self._owns_meters else None
        if self._owns_provider and provider is not None:
            # The SDK also shuts its providers down at interpreter exit, unbounded (a collector
            # that is down held exit for seconds more): this bounded shutdown replaces it.
            for owned in (provider, meters):
                handler = getattr(owned, "_atexit_handler", None)
                if owned is not None and handler is not None:
                    atexit.unregister(handler)
                    owned._atexit_handler = None

            def flush_and_shutdown() -> None:
                provider.force_flush(timeout_millis)
                provider.shutdown()
                if meters is not None:
                    meters.shutdown(timeout_millis=timeout_millis)

            worker = threading.Thread(
                target=flush_and_shutdown, name="chatter-otel-shutdown", daemon=True
            )
            worker.start()
            worker.join(timeout_millis / 1000)
            if worker.is_alive():
                _log.warning(
                    "chatter-otel: telemetry did not shut down within %d ms (collector down?);"
                    " spans still queued may be lost",
                    timeout_millis,
                )
        with _lock:
            if _current is self:
                _current = None


def configure_for_zero_code() -> Telemetry | None:
    """What ``LangGraphInstrumentor().instrument()`` adds when it is instrumented on its own
    (``opentelemetry-instrument``): on the SDK provider the distro set up (its exporters, from
    ``OTEL_TRACES_EXPORTER``, the local store's ``chatter_local`` included), the correlation
    baggage processor, monitoring, events and analytics with the GenAI metrics, log ids and
    outbound propagation. Not the app object (no middleware: see the README). None when the app
    called ``configure`` itself or there is no SDK provider."""
    global _current  # noqa: PLW0603
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        _log.info("chatter-otel: no SDK tracer provider; only the spans are instrumented")
        return None
    with _lock:
        if _current is not None:
            return None
        install_log_record_factory()
        if provider not in _with_baggage:
            provider.add_span_processor(ValidatingBaggageSpanProcessor())
            _with_baggage.add(provider)
        meters, _ = _meters(None, provider, None, set_global=False)
        from chatter_otel.export.guard import guard_existing

        guard_existing(provider, meters, scrub_text=not exception_text_captured())
        tel = Telemetry(provider, owns_provider=False, exporter_name="OTEL_TRACES_EXPORTER",
                        trace_store=None, instrumentor=None)  # fmt: skip
        tel.meter_provider = meters
        _install_processors(
            tel, provider, meters, events=True, monitoring=True, analytics=True,
            record_completion=None, persistence=None,
        )  # fmt: skip
        _instrument_logging(tel)
        _instrument_outbound(tel)
        _current = tel
        return tel


def _forward_events(tel: Telemetry, emit: Callable[[Any], Any],
                    convert: Callable[[Any], Any] | None) -> None:  # fmt: skip
    """configure(events_to=...): forwarding set up now, no event loop needed (sinks/forward)."""
    from chatter_otel.sinks.fill import fill_app_events
    from chatter_otel.sinks.forward import AppEventForwarder

    skip = None
    if tel._app_usage is not None:  # the app emits its own workflow events: fill those
        undo = fill_app_events(emit, tel._app_usage)
        if undo is not None:
            tel._undo.append(undo)
            skip = _is_workflow_event
    forwarder = AppEventForwarder(tel.events, emit, convert, skip=skip)
    tel.forwarder = forwarder
    tel._undo.append(forwarder.close)


def _is_workflow_event(event: Any) -> bool:
    """Ours, for a run the app tracks and reports itself (its own events are filled)."""
    return bool(event.metadata.get("app_tracked")) and event.event_type in (
        "workflow_started", "workflow_completed", "workflow_failed",
    )  # fmt: skip


def _meters(
    given: MeterProvider | None, tracer_provider: TracerProvider, exporter: str | None, *,
    set_global: bool,
) -> tuple[MeterProvider, bool]:  # fmt: skip
    """The app's meter provider (given, or installed globally), else one built from
    ``OTEL_METRICS_EXPORTER`` (export/metrics.py); and whether it was built here. The GenAI
    metrics, the ledger's and the span queue's counters go there."""
    if given is not None:
        return given, False
    existing = metrics.get_meter_provider()
    if isinstance(existing, SdkMeterProvider):
        return existing, False
    built = meter_provider_from_env(tracer_provider.resource, exporter)
    if built is None:
        return existing, False
    if set_global:
        metrics.set_meter_provider(built)
    return built, True


def _instrument_logging(tel: Telemetry) -> None:
    """contrib's ``LoggingInstrumentor`` (``otelTraceID``, ``otelSpanID``, ``otelServiceName``
    on every record; the log format is left to the app), beside our record factory's
    ``trace_id``, ``span_id`` and ``correlation_id``."""
    from opentelemetry.instrumentation.logging import LoggingInstrumentor

    inst = LoggingInstrumentor()
    if not inst.is_instrumented_by_opentelemetry:
        inst.instrument(
            tracer_provider=tel.tracer_provider,
            set_logging_format=False,
            inject_trace_context=True,
        )
        tel._undo.append(inst.uninstrument)


def _instrument_outbound(tel: Telemetry, baggage_keys: Sequence[str] | None = None) -> None:
    """Outbound HTTP calls (the model client's included) carry ``traceparent`` and ``baggage``
    (the correlation id and the keys the app allows, nothing else: propagation.py): the httpx
    and requests instrumentations, where installed."""
    tel._undo.append(filter_outbound_baggage(baggage_keys))
    for module, cls in (
        ("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor"),
        # httpx2: what the openai SDK (and so ChatOpenAI) sends its requests with since 3.x
        ("opentelemetry.instrumentation.httpx", "HTTPX2ClientInstrumentor"),
        ("opentelemetry.instrumentation.requests", "RequestsInstrumentor"),
    ):
        try:
            inst = getattr(__import__(module, fromlist=[cls]), cls)()
            if inst.is_instrumented_by_opentelemetry:
                continue
            inst.instrument(tracer_provider=tel.tracer_provider)
        except (ImportError, AttributeError):  # not installed: nothing to propagate through
            continue
        tel._undo.append(inst.uninstrument)


def _pick(option: Any, builtin: Callable[[], Any]) -> Any:
    """``True``: the built-in sink; ``False``/``None``: off; anything else: the app's own."""
    if option is False or option is None:
        return None
    return builtin() if option is True else option


def _install_processors(
    tel: Telemetry, provider: TracerProvider, meters: MeterProvider, *, events: Any,
    monitoring: Any, analytics: Any, record_completion: Any, persistence: Any,
    monitoring_llm_metrics: Any = None, monitoring_timestamps: str = "datetime",
    monitoring_mode: str = "fill", correct_app_usage: bool = False,
) -> None:  # fmt: skip
    """Events, monitoring, analytics/metrics and (when given) the usage ledger."""
    tel.events = _pick(events, EventBus)
    tel.monitoring = _pick(monitoring, MonitoringService)
    tel.analytics = _pick(analytics, LiveAnalytics)
    if tel.events is not None:
        tel._undo.append(_attach(provider, "events", EventSpanProcessor, bus=tel.events))
    fill = monitoring_mode == "fill" and monitoring not in (True, False, None)
    if monitoring_mode not in ("fill", "parallel"):
        _log.warning("chatter-otel: MonitoringOptions(mode=%r) is not fill or parallel; using fill",
                     monitoring_mode)  # fmt: skip
    if tel.monitoring is not None:
        tel._undo.append(
            _attach(provider, "monitoring", MonitoringSpanProcessor, service=tel.monitoring,
                    llm_metrics=monitoring_llm_metrics, timestamps=monitoring_timestamps,
                    workflows=not fill)
        )  # fmt: skip
        if fill:
            from chatter_otel.sinks.fill import AppUsage, fill_app_monitoring

            tel._app_usage = AppUsage(meters, correct=correct_app_usage)
            tel._undo.append(fill_app_monitoring(tel.monitoring, tel._app_usage))
    tel._undo.append(
        _attach(
            provider,
            "analytics",
            AnalyticsSpanProcessor,
            analytics=tel.analytics,
            record_completion=record_completion,
            meter_provider=meters,
        )
    )
    if persistence is not None:
        from chatter_otel.persistence import LedgerSpanProcessor

        persistence.install()
        persistence.start(meters)
        tel._undo.append(persistence.close)
        tel._undo.append(_attach(provider, "ledger", LedgerSpanProcessor, persistence=persistence))
    tel.persistence = persistence


def _attach(provider: TracerProvider, kind: str, cls: Any, **sinks: Any) -> Callable[[], None]:
    """Attach the ``kind`` processor to the provider's one ``RecordFanout`` once, or point the
    existing one at ``sinks``; returns how to detach it (processors cannot be removed from a
    provider)."""
    fanout = _fanouts.get(provider)
    if fanout is None:
        fanout = _fanouts[provider] = RecordFanout()
        provider.add_span_processor(fanout)
    processor = fanout.sinks.get(kind)
    if processor is None:
        processor = cls(**sinks)
        fanout.attach(kind, processor)
    else:
        processor.repoint(**sinks)
    detach: Callable[[], None] = processor.detach
    return detach
