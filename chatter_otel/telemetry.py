"""``chatter_otel.configure``: the one call at startup.

It builds (or reuses) the tracer provider, picks the exporter, and instruments LangGraph and
LangChain. Resolution is keyword argument > environment variable > default:

* resource: ``service_name`` / ``service_version`` / ``environment`` keywords, else the SDK's
  ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, else ``service.name=chatter-app``;
* exporter: ``exporter=`` (``"otlp"``, ``"local"`` or ``"none"``), else ``OTEL_TRACES_EXPORTER``,
  else OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set, else the local trace store. The OTLP protocol comes from
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or
  ``http/protobuf``, the default); endpoint, headers, timeout, compression and certificates are
  read by the OTLP exporters themselves from the standard variables;
* sampler: the SDK reads ``OTEL_TRACES_SAMPLER`` / ``_ARG``;
* ``OTEL_SDK_DISABLED=true``: nothing is built or instrumented; a ``Telemetry`` is still
  returned so the app's code path does not change.

A tracer provider the app (or ``opentelemetry-instrument``) already installed globally is reused:
exporters are only added to one this call builds; the ``BaggageSpanProcessor`` that copies
``chatter.correlation.id`` onto every span is added to either. Calling ``configure`` again
returns the same ``Telemetry`` until it is shut down.

Given the app's FastAPI ``app``, it turns on the FastAPI OpenTelemetry instrumentation (the
server span) and adds ``CorrelationMiddleware``; given SQLAlchemy ``engines`` (sync or async),
the SQLAlchemy instrumentation, so one trace shows the request, the graph run and the app's own
queries. ``log_correlation`` (default on) makes every log record carry ``trace_id``, ``span_id``
and ``correlation_id``.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel.correlation import (
    CorrelationMiddleware,
    ValidatingBaggageSpanProcessor,
    install_log_record_factory,
    unregister_app_sources,
)
from chatter_otel.export.metrics import meter_provider_from_env
from chatter_otel.export.otlp import (
    batch_processor,
    entry_point_exporter,
    exporter_names,
    otlp_exporter,
)
from chatter_otel.export.store import LocalStoreExporter, LocalTraceStore
from chatter_otel.instrumentation.instrumentor import LangGraphInstrumentor
from chatter_otel.instrumentation.settings import exception_text_captured, resolve_bool
from chatter_otel.propagation import filter_outbound_baggage
from chatter_otel.sinks.analytics import AnalyticsSpanProcessor, LiveAnalytics
from chatter_otel.sinks.events import EventBus, EventSpanProcessor
from chatter_otel.sinks.monitoring import MonitoringService, MonitoringSpanProcessor

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence
    from contextvars import ContextVar

    from opentelemetry.metrics import MeterProvider

__all__ = ["Telemetry", "configure"]

_log = logging.getLogger("chatter_otel")

_DEFAULT_SERVICE = "chatter-app"
_lock = threading.Lock()
_current: Telemetry | None = None
_with_baggage: weakref.WeakSet[TracerProvider] = weakref.WeakSet()
# provider -> {kind: processor}; weak, so a new provider never inherits a dead one's processors
_processors: weakref.WeakKeyDictionary[TracerProvider, dict[str, Any]] = weakref.WeakKeyDictionary()


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
        self._fill = False
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


def _resource(service_name: str | None, service_version: str | None, env: str | None) -> Resource:
    attrs: dict[str, str] = {}
    if service_name:
        attrs["service.name"] = service_name
    if service_version:
        attrs["service.version"] = service_version
    if env:
        attrs["deployment.environment.name"] = env
    resource = Resource.create(attrs)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": _DEFAULT_SERVICE}))
    return resource


def configure(
    *,
    service_name: str | None = None,
    service_version: str | None = None,
    environment: str | None = None,
    exporter: str | None = None,
    trace_store: str | os.PathLike[str] | LocalTraceStore | None = None,
    tracer_provider: TracerProvider | None = None,
    set_global: bool = True,
    app: Any = None,
    engines: Sequence[Any] = (),
    log_correlation: bool = True,
    correlation_getter: Callable[[], str | None] | None = None,
    correlation_context_var: ContextVar[Any] | None = None,
    meter_provider: MeterProvider | None = None,
    events: bool | Any = True,
    monitoring: bool | Any = True,
    analytics: bool | Any = True,
    record_completion: Callable[[Any], Any] | None = None,
    persistence: Any = None,
    metrics_exporter: str | None = None,
    monitoring_llm_metrics: Any = None,
    monitoring_timestamps: str = "datetime",
    events_to: Callable[[Any], Any] | None = None,
    event_converter: Callable[[Any], Any] | None = None,
    monitoring_mode: str = "fill",
    propagate_baggage_keys: Sequence[str] | None = None,
    **instrument_options: Any,
) -> Telemetry:
    """Set up tracing and instrument LangGraph/LangChain; see the module docstring.

    ``instrument_options`` go to ``LangGraphInstrumentor.instrument`` (``capture_content``,
    ``prices``, ``redact``, ...). ``set_global=False`` leaves the global tracer provider alone.
    """
    global _current  # noqa: PLW0603
    if log_correlation:  # first: every line from here on (configure's own too) has the ids
        install_log_record_factory()
    with _lock:
        if _current is not None:
            # Idempotent; an app or engines given now (configure() at import, then again in
            # create_app or the lifespan) are instrumented on the existing setup.
            if app is not None and _current.tracer_provider is not None:
                _guarded_app(_current, app, correlation_getter, correlation_context_var)
            if engines and _current.tracer_provider is not None:
                _instrument_engines(_current, engines)
            return _current
        if resolve_bool("OTEL_SDK_DISABLED", None, False):
            _log.info("chatter-otel: OTEL_SDK_DISABLED is set; telemetry is off")
            _current = Telemetry(
                None, owns_provider=False, exporter_name="none", trace_store=None,
                instrumentor=None,
            )  # fmt: skip
            return _current
        owns = False
        if tracer_provider is None:
            existing = trace.get_tracer_provider()
            if isinstance(existing, TracerProvider):
                tracer_provider = existing
            else:
                tracer_provider = TracerProvider(
                    resource=_resource(service_name, service_version, environment)
                )
                owns = True
        names = exporter_names(exporter)
        meters, owns_meters = _meters(
            meter_provider, tracer_provider, metrics_exporter, set_global=set_global
        )
        store = None
        if owns or exporter is not None:
            scrub = not exception_text_captured(
                instrument_options.get("capture_content"),
                instrument_options.get("capture_exception_text"),
            )
            store = _add_exporters(tracer_provider, names, meters, trace_store, scrub)
        name = ",".join(names) or "none"
        if tracer_provider not in _with_baggage:
            tracer_provider.add_span_processor(ValidatingBaggageSpanProcessor())
            _with_baggage.add(tracer_provider)
        if owns and set_global:
            trace.set_tracer_provider(tracer_provider)
        instrumentor = LangGraphInstrumentor()
        instrumentor.instrument(tracer_provider=tracer_provider, **instrument_options)
        tel = Telemetry(
            tracer_provider, owns_provider=owns, exporter_name=name, trace_store=store,
            instrumentor=instrumentor,
        )  # fmt: skip
        tel.meter_provider = meters
        tel._owns_meters = owns_meters
        _install_processors(
            tel, tracer_provider, meters, events=events, monitoring=monitoring,
            analytics=analytics, record_completion=record_completion, persistence=persistence,
            monitoring_llm_metrics=monitoring_llm_metrics,
            monitoring_timestamps=monitoring_timestamps, monitoring_mode=monitoring_mode,
        )  # fmt: skip
        if events_to is not None and tel.events is not None:
            _forward_events(tel, events_to, event_converter)
        if log_correlation:
            _instrument_logging(tel)
        _instrument_outbound(tel, propagate_baggage_keys)
        if app is not None:
            _guarded_app(tel, app, correlation_getter, correlation_context_var)
        if engines:
            _instrument_engines(tel, engines)
        _current = tel
        return tel


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


def _add_exporters(
    provider: TracerProvider, names: list[str], meters: MeterProvider, trace_store: Any,
    scrub: bool,
) -> LocalTraceStore | None:  # fmt: skip
    """One guarded ``BatchSpanProcessor`` per named exporter; the local store, if one of them."""
    store = None
    for name in names:
        exporter: Any
        if name == "otlp":
            exporter = otlp_exporter()
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stdout as it is now (the SDK's default is the one at its import)
            exporter = ConsoleSpanExporter(out=sys.stdout)
        elif name != "local":  # a registered entry point's exporter
            exporter = entry_point_exporter(name)
        else:
            store = (
                trace_store
                if isinstance(trace_store, LocalTraceStore)
                else LocalTraceStore(trace_store)
            )
            exporter = LocalStoreExporter(store)
        provider.add_span_processor(batch_processor(exporter, meters, name, scrub_text=scrub))
    return store


def _forward_events(tel: Telemetry, emit: Callable[[Any], Any],
                    convert: Callable[[Any], Any] | None) -> None:  # fmt: skip
    """configure(events_to=...): forwarding set up now, no event loop needed (sinks/forward)."""
    from chatter_otel.sinks.fill import fill_app_events
    from chatter_otel.sinks.forward import AppEventForwarder

    skip = None
    if tel._fill:  # the app emits its own workflow events: fill those, do not add ours
        undo = fill_app_events(emit)
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
    monitoring_mode: str = "fill",
) -> None:  # fmt: skip
    """Events, monitoring, analytics/metrics and (when given) the usage ledger."""
    tel.events = _pick(events, EventBus)
    tel.monitoring = _pick(monitoring, MonitoringService)
    tel.analytics = _pick(analytics, LiveAnalytics)
    if tel.events is not None:
        tel._undo.append(_attach(provider, "events", EventSpanProcessor, bus=tel.events))
    fill = monitoring_mode == "fill" and monitoring not in (True, False, None)
    if monitoring_mode not in ("fill", "parallel"):
        _log.warning("chatter-otel: monitoring_mode=%r is not fill or parallel; using fill",
                     monitoring_mode)  # fmt: skip
    if tel.monitoring is not None:
        tel._undo.append(
            _attach(provider, "monitoring", MonitoringSpanProcessor, service=tel.monitoring,
                    llm_metrics=monitoring_llm_metrics, timestamps=monitoring_timestamps,
                    workflows=not fill)
        )  # fmt: skip
        if fill:
            from chatter_otel.sinks.fill import fill_app_monitoring

            tel._undo.append(fill_app_monitoring(tel.monitoring))
    tel._fill = fill
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
    """Add the ``kind`` processor to ``provider`` once, or point the existing one at ``sinks``;
    returns how to detach it (processors cannot be removed from a provider)."""
    mine = _processors.setdefault(provider, {})
    processor = mine.get(kind)
    if processor is None:
        processor = cls(**sinks)
        provider.add_span_processor(processor)
        mine[kind] = processor
    else:
        processor.repoint(**sinks)
    detach: Callable[[], None] = processor.detach
    return detach


def _guarded_app(
    tel: Telemetry, app: Any, getter: Callable[[], str | None] | None,
    context_var: ContextVar[Any] | None,
) -> None:  # fmt: skip
    """configure() never raises: an app it cannot instrument is logged, the rest stays."""
    try:
        _instrument_app(tel, app, getter, context_var)
    except Exception:
        _log.exception("chatter-otel: could not instrument the app; its requests have no "
                       "correlation ids or server spans")  # fmt: skip


def _instrument_app(
    tel: Telemetry,
    app: Any,
    getter: Callable[[], str | None] | None,
    context_var: ContextVar[Any] | None,
) -> None:
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.instrumentation.propagators import (
            TraceResponsePropagator,
            get_global_response_propagator,
            set_global_response_propagator,
        )
    except ImportError as exc:
        _log.error("chatter-otel: configure(app=...) needs the 'fastapi' extra: pip install "
                   "'chatter-otel[fastapi]' (%s); the app is not instrumented", exc)  # fmt: skip
        return
    if getattr(app, "_chatter_otel_correlation", False):
        return  # this app is done already (a second configure, or create_app called twice)
    app._chatter_otel_correlation = True
    tel._undo.append(unregister_app_sources)
    if get_global_response_propagator() is None:  # type: ignore[no-untyped-call]
        set_global_response_propagator(TraceResponsePropagator())  # type: ignore[no-untyped-call]
    if not getattr(app, "_is_instrumented_by_opentelemetry", False):
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tel.tracer_provider)
        tel._undo.append(lambda: FastAPIInstrumentor.uninstrument_app(app))
    # Right inside the server span and outside Starlette's error middleware: the id is on the
    # server span, and a 500 gets the correlation id and `traceresponse` like any response.
    original = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        return _with_correlation(original(), getter, context_var)

    app.build_middleware_stack = build_middleware_stack
    tel._undo.append(lambda: setattr(app, "build_middleware_stack", original))
    if getattr(app, "middleware_stack", None) is not None:
        # Called from the lifespan: the stack is built already and Starlette refuses new
        # middleware. Build it again, with ours and the server spans, before any request.
        app.middleware_stack = app.build_middleware_stack()
        _log.info("chatter-otel: configure(app=...) ran after the app started; its middleware "
                  "stack was rebuilt with the correlation middleware and server spans")  # fmt: skip


def _with_correlation(
    stack: Any, getter: Callable[[], str | None] | None, context_var: ContextVar[Any] | None
) -> Any:
    """``stack`` with the correlation middleware just inside the FastAPI instrumentation's
    ``OpenTelemetryMiddleware`` (it is wrapped in one more ``ServerErrorMiddleware``), or
    around the whole stack when that instrumentation is not there."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    inner = getattr(stack, "app", None)
    if isinstance(inner, OpenTelemetryMiddleware):
        inner.app = CorrelationMiddleware(inner.app, getter=getter, context_var=context_var)
        return stack
    return CorrelationMiddleware(stack, getter=getter, context_var=context_var)


def _instrument_engines(tel: Telemetry, engines: Sequence[Any]) -> None:
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError as exc:
        _log.error("chatter-otel: configure(engines=...) needs the 'persistence' extra: pip "
                   "install 'chatter-otel[persistence]' (%s); the engines are not "
                   "instrumented", exc)  # fmt: skip
        return
    sync_engines = [getattr(e, "sync_engine", e) for e in engines]  # AsyncEngine -> Engine
    inst = SQLAlchemyInstrumentor()
    if not inst.is_instrumented_by_opentelemetry:
        # The contrib package declares SQLAlchemy < 2.1; it works on 2.1 (tested).
        inst.instrument(
            engines=sync_engines, tracer_provider=tel.tracer_provider, skip_dep_check=True
        )
        tel._undo.append(inst.uninstrument)
