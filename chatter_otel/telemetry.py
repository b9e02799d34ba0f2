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

A tracer provider the app (or ``opentelemetry-instrument``) already installed globally is reused
as is: exporters are only added to one this call builds. Calling ``configure`` again returns the
same ``Telemetry`` until it is shut down.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from chatter_otel._settings import resolve_bool
from chatter_otel.instrumentor import LangGraphInstrumentor
from chatter_otel.store import LocalStoreExporter, LocalTraceStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Telemetry", "configure"]

_log = logging.getLogger("chatter_otel")

_DEFAULT_SERVICE = "chatter-app"
_EXPORTERS = ("otlp", "local", "none")
_lock = threading.Lock()
_current: Telemetry | None = None


class Telemetry:
    """What ``configure`` set up. ``force_flush()`` and ``shutdown()`` are bounded in time.

    ``monitoring``, ``events`` and ``analytics`` are reserved for the span processors of the
    processors issue and are ``None`` until they exist.
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
        self._owns_provider = owns_provider

    def force_flush(self, timeout_millis: int = 5_000) -> bool:
        provider = self.tracer_provider
        return bool(provider.force_flush(timeout_millis)) if provider is not None else True

    def shutdown(self, timeout_millis: int = 5_000) -> None:
        """Flush (within ``timeout_millis``), uninstrument, and shut down what was built here."""
        global _current  # noqa: PLW0603 - the process-wide configuration, like the SDK's
        self.force_flush(timeout_millis)
        if self.instrumentor is not None:
            self.instrumentor.uninstrument()
        if self._owns_provider and self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        with _lock:
            if _current is self:
                _current = None


def _exporter_name(kwarg: str | None) -> str:
    if kwarg is not None:
        if kwarg in _EXPORTERS:
            return kwarg
        _log.warning("chatter-otel: unknown exporter=%r; using the default", kwarg)
    env = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if env:
        first = env.split(",")[0].strip()
        if first in _EXPORTERS:
            return first
        _log.warning("chatter-otel: ignoring OTEL_TRACES_EXPORTER=%r (use otlp or none)", env)
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return "otlp"
    return "local"


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        _log.warning("chatter-otel: unsupported OTLP protocol %r; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()


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
    **instrument_options: Any,
) -> Telemetry:
    """Set up tracing and instrument LangGraph/LangChain; see the module docstring.

    ``instrument_options`` go to ``LangGraphInstrumentor.instrument`` (``capture_content``,
    ``prices``, ``redact``, ...). ``set_global=False`` leaves the global tracer provider alone.
    """
    global _current  # noqa: PLW0603
    with _lock:
        if _current is not None:
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
        name = _exporter_name(exporter)
        store = None
        if owns or exporter is not None:
            if name == "otlp":
                tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
            elif name == "local":
                store = (
                    trace_store
                    if isinstance(trace_store, LocalTraceStore)
                    else LocalTraceStore(trace_store)
                )
                tracer_provider.add_span_processor(BatchSpanProcessor(LocalStoreExporter(store)))
        if owns and set_global:
            trace.set_tracer_provider(tracer_provider)
        instrumentor = LangGraphInstrumentor()
        instrumentor.instrument(tracer_provider=tracer_provider, **instrument_options)
        _current = Telemetry(
            tracer_provider, owns_provider=owns, exporter_name=name, trace_store=store,
            instrumentor=instrumentor,
        )  # fmt: skip
        return _current
