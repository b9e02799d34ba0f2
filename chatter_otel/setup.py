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

import logging
import sys
import uuid
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel import telemetry as _state
from chatter_otel.correlation import (
    CorrelationMiddleware,
    ValidatingBaggageSpanProcessor,
    install_log_record_factory,
    unregister_app_sources,
)
from chatter_otel.export.otlp import (
    batch_processor,
    entry_point_exporter,
    exporter_names,
    otlp_exporter,
)
from chatter_otel.export.store import LocalStoreExporter, LocalTraceStore
from chatter_otel.instrumentation.instrumentor import LangGraphInstrumentor
from chatter_otel.instrumentation.settings import exception_text_captured, resolve_bool
from chatter_otel.options import EventOptions, MonitoringOptions
from chatter_otel.telemetry import (
    Telemetry,
    _forward_events,
    _install_processors,
    _instrument_logging,
    _instrument_outbound,
    _meters,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence
    from contextvars import ContextVar

    from opentelemetry.metrics import MeterProvider

__all__ = ["configure"]

_log = logging.getLogger("chatter_otel")

_DEFAULT_SERVICE = "chatter-app"


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
    if "service.instance.id" not in resource.attributes:
        # One per process, as the conventions ask: the app's workers push cumulative metrics
        # under the same service name, and a collector's Prometheus exporter keys their series
        # by it (the scrape's `instance`); without it the workers overwrite each other's totals.
        resource = resource.merge(Resource({"service.instance.id": str(uuid.uuid4())}))
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
    events: bool | EventOptions | Any = True,
    monitoring: bool | MonitoringOptions | Any = True,
    analytics: bool | Any = True,
    record_completion: Callable[[Any], Any] | None = None,
    persistence: Any = None,
    metrics_exporter: str | None = None,
    propagate_baggage_keys: Sequence[str] | None = None,
    **instrument_options: Any,
) -> Telemetry:
    """Set up tracing and instrument LangGraph/LangChain; see the module docstring.

    ``instrument_options`` go to ``LangGraphInstrumentor.instrument`` (``capture_content``,
    ``prices``, ``redact``, ...). ``set_global=False`` leaves the global tracer provider alone.
    """
    if log_correlation:  # first: every line from here on (configure's own too) has the ids
        install_log_record_factory()
    with _state._lock:
        if _state._current is not None:
            # Idempotent; an app or engines given now (configure() at import, then again in
            # create_app or the lifespan) are instrumented on the existing setup.
            if app is not None and _state._current.tracer_provider is not None:
                _guarded_app(_state._current, app, correlation_getter, correlation_context_var)
            if engines and _state._current.tracer_provider is not None:
                _instrument_engines(_state._current, engines)
            return _state._current
        if resolve_bool("OTEL_SDK_DISABLED", None, False):
            _log.info("chatter-otel: OTEL_SDK_DISABLED is set; telemetry is off")
            _state._current = Telemetry(
                None, owns_provider=False, exporter_name="none", trace_store=None,
                instrumentor=None,
            )  # fmt: skip
            return _state._current
        owns = False
        mon = monitoring if isinstance(monitoring, MonitoringOptions) else MonitoringOptions(
            service=monitoring
        )  # fmt: skip
        ev = events if isinstance(events, EventOptions) else EventOptions(bus=events)
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
        if tracer_provider not in _state._with_baggage:
            tracer_provider.add_span_processor(ValidatingBaggageSpanProcessor())
            _state._with_baggage.add(tracer_provider)
        if owns and set_global:
            trace.set_tracer_provider(tracer_provider)
        instrumentor = LangGraphInstrumentor()
        instrumentor.instrument(tracer_provider=tracer_provider,
                                **{"meter_provider": meters, **instrument_options})  # fmt: skip
        tel = Telemetry(
            tracer_provider, owns_provider=owns, exporter_name=name, trace_store=store,
            instrumentor=instrumentor,
        )  # fmt: skip
        tel.meter_provider = meters
        tel._owns_meters = owns_meters
        _install_processors(
            tel, tracer_provider, meters, events=ev.bus, monitoring=mon.service,
            analytics=analytics, record_completion=record_completion, persistence=persistence,
            monitoring_llm_metrics=mon.llm_metrics, monitoring_timestamps=mon.timestamps,
            monitoring_mode=mon.mode, correct_app_usage=mon.correct_app_usage,
        )  # fmt: skip
        if ev.forward_to is not None and tel.events is not None:
            _forward_events(tel, ev.forward_to, ev.converter)
        if log_correlation:
            _instrument_logging(tel)
        _instrument_outbound(tel, propagate_baggage_keys)
        if app is not None:
            _guarded_app(tel, app, correlation_getter, correlation_context_var)
        if engines:
            _instrument_engines(tel, engines)
        _state._current = tel
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
        # Without the ASGI `http send`/`http receive` sub-spans: one per ASGI message (three
        # for a JSON answer, one per chunk of a streamed one), each costing what a server span
        # does and saying nothing the server span does not. An app that wants them
        # instruments itself first (FastAPIInstrumentor), and this is skipped.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tel.tracer_provider,
                                           exclude_spans=["receive", "send"])  # fmt: skip
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
