"""Where ``chatter-otel trace`` / ``find`` read traces from: the local store, Jaeger or Tempo.

Each source turns its backend's documented response shape into ``SpanRecord``s, so the CLI
renders the same tree whatever the source:

* Jaeger v2 (``/api/v3/traces/{id}``, ``/api/v3/traces?query.service_name=...``: OTLP JSON in
  ``{"result": {"resourceSpans": [...]}}``, possibly one document per stream chunk), falling
  back to the v1 JSON API (``/api/traces/{id}``, ``/api/traces?service=&tags=``). Jaeger's
  search needs a service name and a time window; the correlation id is filtered on the spans.
* Tempo (``/api/v2/traces/{id}`` -> ``{"trace": {...}}``, else ``/api/traces/{id}`` ->
  ``{"batches": [...]}``; JSON, or protobuf with ``Accept: application/protobuf``), and TraceQL
  search (``/api/search?q={span.chatter.correlation.id="..."}``).

Ids in responses may be hex (OTLP/JSON) or base64 (protobuf JSON mapping, as Tempo and some
Jaeger versions write them); both are read. Failures raise ``SourceError`` with one clear line.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from chatter_otel.export.store import LocalTraceStore, TraceSummary
from chatter_otel.traces.backends import (
    MAX_RESPONSE_BYTES,
    Connection,
    JaegerSource,
    TempoSource,
)
from chatter_otel.traces.decode import SourceError, normalize_trace_id

if TYPE_CHECKING:
    from chatter_otel.traces.spans import SpanRecord

__all__ = [
    "Connection",
    "JaegerSource",
    "SourceError",
    "TempoSource",
    "TraceSource",
    "normalize_trace_id",
    "open_source",
]


class TraceSource(Protocol):
    def trace(self, trace_id: str) -> list[SpanRecord]: ...

    def find(self, **ids: str | None) -> list[TraceSummary]: ...


ENV_URL = {"jaeger": "CHATTER_OTEL_JAEGER_URL", "tempo": "CHATTER_OTEL_TEMPO_URL"}
ENV_HEADERS = "CHATTER_OTEL_QUERY_HEADERS"


def parse_headers(given: list[str], env: str | None) -> dict[str, str]:
    """``--header 'Name: value'`` (repeatable) over ``CHATTER_OTEL_QUERY_HEADERS``
    (``name=value,name2=value2``, URL-encoded values: the ``OTEL_EXPORTER_OTLP_HEADERS`` form)."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for item in filter(None, (env or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SourceError(f"{ENV_HEADERS}: expected name=value pairs, got {name.strip()!r}")
        out[name.strip()] = unquote(value.strip())
    for item in given:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise SourceError(f"--header: expected 'Name: value', got {name.strip()!r}")
        out[name.strip()] = value.strip()
    for name, value in out.items():  # a header must not smuggle a second line
        if any(c in name + value for c in "\r\n\0"):
            raise SourceError(f"header {name!r}: no line breaks or NUL allowed")
    return out


def open_source(kind: str, *, url: str | None, store: str | None, service: str | None,
                lookback_s: float, protobuf: bool, timeout_s: float = 30.0,
                max_bytes: int = MAX_RESPONSE_BYTES,
                connection: Connection | None = None) -> Any:  # fmt: skip
    """The source the CLI's ``--from`` names; a backend gets the command's deadline and cap,
    its URL from ``--url`` or ``CHATTER_OTEL_JAEGER_URL`` / ``CHATTER_OTEL_TEMPO_URL``."""
    if kind in ENV_URL:
        url = url or os.environ.get(ENV_URL[kind])
        if not url:
            raise SourceError(f"--from {kind} needs --url or {ENV_URL[kind]}")
    if kind == "jaeger":
        return JaegerSource(url or "", service=service, lookback_s=lookback_s,
                            timeout_s=timeout_s, max_bytes=max_bytes,
                            connection=connection)  # fmt: skip
    if kind == "tempo":
        return TempoSource(url or "", protobuf=protobuf, lookback_s=lookback_s,
                           timeout_s=timeout_s, max_bytes=max_bytes,
                           connection=connection)  # fmt: skip
    from chatter_otel.export.store import default_store_path

    path = store or default_store_path()
    if not os.path.exists(path):
        raise SourceError(f"no trace store at {path} (run the app or `chatter-otel demo` first)")
    return LocalTraceStore(path)
