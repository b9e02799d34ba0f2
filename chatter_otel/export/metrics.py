"""The meter provider ``configure`` builds when the app brings none, the standard way.

``OTEL_METRICS_EXPORTER`` (a comma-separated list): ``otlp`` (a periodic reader and the OTLP
metric exporter, HTTP or gRPC per ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_PROTOCOL``), ``prometheus`` (the Prometheus exporter's reader and its
scrape endpoint on ``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT``, default
localhost:9464; the ``prometheus`` extra), ``console``, ``none``. Unset: ``otlp`` when an OTLP
endpoint is configured (``OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT``), else ``none``: like traces,
nothing is sent to a collector nobody configured. An unknown name warns and is skipped.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

from chatter_otel.export.otlp import otlp_protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

__all__ = ["meter_provider_from_env", "metric_exporter_names"]

_log = logging.getLogger("chatter_otel")
_KNOWN = ("otlp", "prometheus", "console", "none")


def metric_exporter_names(kwarg: str | None = None) -> list[str]:
    raw = kwarg if kwarg is not None else os.environ.get("OTEL_METRICS_EXPORTER", "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if not names:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    out = []
    for name in names:
        if name not in _KNOWN:
            _log.warning("chatter-otel: ignoring %r in OTEL_METRICS_EXPORTER (use otlp, "
                         "prometheus, console or none)", name)  # fmt: skip
        elif name != "none" and name not in out:
            out.append(name)
    return out


def _otlp_reader() -> MetricReader:
    protocol = otlp_protocol("metrics")
    exporter: Any
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HTTPMetricExporter,
        )

        exporter = HTTPMetricExporter()
    return PeriodicExportingMetricReader(exporter)


def _prometheus_reader() -> MetricReader | None:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server
    except ImportError as exc:
        _log.error("chatter-otel: OTEL_METRICS_EXPORTER=prometheus needs the 'prometheus' "
                   "extra: pip install 'chatter-otel[prometheus]' (%s)", exc)  # fmt: skip
        return None
    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
    port_raw = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
    try:
        port = int(port_raw)
    except ValueError:
        _log.warning("chatter-otel: ignoring OTEL_EXPORTER_PROMETHEUS_PORT=%r; using 9464",
                     port_raw)  # fmt: skip
        port = 9464
    try:
        start_http_server(port=port, addr=host)
    except OSError as exc:
        _log.error("chatter-otel: cannot serve Prometheus metrics on %s:%d (%s)", host, port,
                   exc)  # fmt: skip
        return None
    reader: MetricReader = PrometheusMetricReader()
    return reader


def meter_provider_from_env(
    resource: Resource, exporter: str | None = None
) -> MeterProvider | None:
    """A ``MeterProvider`` with a reader per named exporter, or None when none is named."""
    readers: list[MetricReader] = []
    for name in metric_exporter_names(exporter):
        if name == "otlp":
            readers.append(_otlp_reader())
        elif name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        elif name == "prometheus" and (reader := _prometheus_reader()) is not None:
            readers.append(reader)
    return MeterProvider(resource=resource, metric_readers=readers) if readers else None
