"""The exporter side of ``configure``: which exporter, OTLP over HTTP or gRPC, and the SDK's
``BatchSpanProcessor`` from the ``OTEL_BSP_*`` variables (a bad set falls back)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace.export import BatchSpanProcessor

from chatter_otel.export.guard import GuardedExporter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "EXPORTERS",
    "batch_processor",
    "entry_point_exporter",
    "exporter_names",
    "otlp_exporter",
    "registered_exporters",
]

_log = logging.getLogger("chatter_otel")

EXPORTERS = ("otlp", "local", "console", "none")


def registered_exporters() -> set[str]:
    """Names in the ``opentelemetry_traces_exporter`` entry point group (the SDK's own, such as
    ``otlp_proto_http``, ``otlp_proto_grpc`` and ``console``, and any third party's)."""
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="opentelemetry_traces_exporter")}


def entry_point_exporter(name: str) -> SpanExporter:
    """An exporter made by the entry point ``name``, as ``opentelemetry-instrument`` makes it."""
    from importlib.metadata import entry_points

    (ep, *_) = entry_points(group="opentelemetry_traces_exporter", name=name)
    exporter: SpanExporter = ep.load()()
    return exporter


def exporter_names(kwarg: str | None) -> list[str]:
    """The trace exporters: ``exporter=`` else ``OTEL_TRACES_EXPORTER``, each a comma-separated
    list of ``otlp`` (protocol from ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``), ``local`` (also
    ``chatter_local``, the entry point's name), ``console``, ``none``, or any name registered
    in the ``opentelemetry_traces_exporter`` entry point group (``otlp_proto_http``,
    ``otlp_proto_grpc``, a third party's); else OTLP when an OTLP endpoint is set, else the
    local store. An unknown name warns and is skipped; ``none`` alone means none."""
    if kwarg is not None:
        source, raw = "exporter=", kwarg
    else:
        source, raw = "OTEL_TRACES_EXPORTER", os.environ.get("OTEL_TRACES_EXPORTER", "")
    names: list[str] = []
    given = [n.strip().lower() for n in raw.split(",") if n.strip()]
    given = ["local" if n == "chatter_local" else n for n in given]
    registered: set[str] | None = None
    for name in given:
        if name not in EXPORTERS:
            registered = registered_exporters() if registered is None else registered
            if name in registered:
                if name not in names:
                    names.append(name)
                continue
            _log.warning("chatter-otel: ignoring %r in %s (use otlp, local, console, none or a "
                         "registered exporter: %s)", name, source,
                         ", ".join(sorted(registered)))  # fmt: skip
        elif name != "none" and name not in names:
            names.append(name)
    if names or "none" in given:
        return names
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ["otlp"]
    return ["local"]


def otlp_protocol(signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_{SIGNAL}_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else
    ``http/protobuf`` (the specification's default)."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def otlp_exporter() -> SpanExporter:
    protocol = otlp_protocol("traces")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        _log.warning("chatter-otel: unsupported OTLP protocol %r; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter(session=_session_keeping_verify())


def _session_keeping_verify() -> Any:
    """A requests session whose own ``verify`` (the exporter's OTEL_EXPORTER_OTLP_CERTIFICATE)
    is not replaced by ``REQUESTS_CA_BUNDLE``.

    The exporter sets ``session.verify``; requests then merges environment settings per request
    and lets ``REQUESTS_CA_BUNDLE`` win over it (a long-standing requests behaviour), so with
    that variable set (common in container images) the configured CA is silently ignored.
    """
    import requests

    class Session(requests.Session):
        def merge_environment_settings(
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and isinstance(self.verify, str):
                settings["verify"] = self.verify
            return settings

    return Session()


def batch_processor(
    exporter: SpanExporter, meters: MeterProvider, name: str, *, scrub_text: bool = True
) -> BatchSpanProcessor:
    """A ``BatchSpanProcessor`` from the ``OTEL_BSP_*`` variables around ``exporter`` guarded
    (export/guard.py: every lost span counted, exception text scrubbed from other
    instrumentations' spans unless ``scrub_text`` is off); an inconsistent set of the variables
    (the SDK raises ValueError, say a batch larger than the queue) logs and uses the defaults.

    Its own metrics (``otel.sdk.processor.span.processed`` with ``error.type=queue_full`` for
    drops, queue size and capacity) are on, on ``meters``: the SDK reads its opt-in
    (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``) when the processor is made, so it is set for
    that moment unless the app set it (``false`` turns them off)."""
    key = "OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED"
    had = os.environ.get(key)
    if had is None:
        os.environ[key] = "true"
    guard = GuardedExporter(exporter, name, meters, scrub_text=scrub_text)
    try:
        processor = _batch(guard, meters)
    finally:
        if had is None:
            os.environ.pop(key, None)
    guard.watch(processor)
    return processor


def _batch(exporter: SpanExporter, meters: MeterProvider) -> BatchSpanProcessor:
    try:
        return BatchSpanProcessor(exporter, meter_provider=meters)
    except ValueError as exc:
        _log.warning("chatter-otel: ignoring the OTEL_BSP_* settings (%s); using defaults", exc)
        return BatchSpanProcessor(
            exporter, max_queue_size=2048, schedule_delay_millis=5000,
            max_export_batch_size=512, export_timeout_millis=30000, meter_provider=meters,
        )  # fmt: skip
