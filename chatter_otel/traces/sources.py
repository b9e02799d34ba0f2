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

import base64
import binascii
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from chatter_otel.attributes import CHATTER_CORRELATION_ID, CHATTER_MESSAGE_ID
from chatter_otel.export.store import LocalTraceStore, TraceSummary
from chatter_otel.traces.spans import SpanRecord

__all__ = ["JaegerSource", "SourceError", "TempoSource", "TraceSource", "normalize_trace_id"]

_HEX = re.compile(r"[0-9a-fA-F]+")
_KEYS = {  # the ids `find` can look for, and their span attribute
    "correlation_id": CHATTER_CORRELATION_ID,
    "conversation_id": "gen_ai.conversation.id",
    "message_id": CHATTER_MESSAGE_ID,
}
_KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


class SourceError(Exception):
    """A backend could not answer: ``code`` 1 for not found, 2 for anything else."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class TraceSource(Protocol):
    def trace(self, trace_id: str) -> list[SpanRecord]: ...

    def find(self, **ids: str | None) -> list[TraceSummary]: ...


def _norm_id(value: Any, nbytes: int) -> str:
    """An id from a response (hex, hex without leading zeros, or base64) as lower-case hex."""
    if isinstance(value, bytes):
        return value.hex() if value else ""
    if not isinstance(value, str) or not value:
        return ""
    if len(value) == 2 * nbytes and _HEX.fullmatch(value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
        if len(raw) == nbytes:
            return raw.hex()
    except (binascii.Error, ValueError):
        pass
    if _HEX.fullmatch(value) and len(value) < 2 * nbytes:
        return value.lower().zfill(2 * nbytes)
    raise SourceError(f"malformed id {value[:40]!r} in the response")


def normalize_trace_id(value: str) -> str:
    """A trace id given on the command line, in hex (32) or base64 (of 16 bytes), as hex."""
    value = value.strip()
    if len(value) == 32 and _HEX.fullmatch(value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 16:
        return raw.hex()
    raise SourceError(f"not a trace id (32 hex digits or base64 of 16 bytes): {value!r}", 2)


# -- OTLP JSON and protobuf ---------------------------------------------------------------------


def _any_value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_any_value(x) for x in (v["arrayValue"].get("values") or [])]
    return None


def _enum(value: Any, names: dict[int, str], prefix: str) -> str:
    if isinstance(value, int):
        return names.get(value, "UNSET")
    if isinstance(value, str):
        return value.removeprefix(prefix) or "UNSET"
    return names[0]


def _records_from_otlp_json(doc: dict[str, Any]) -> list[SpanRecord]:
    out = []
    for rs in doc.get("resourceSpans") or doc.get("batches") or []:
        res = {a["key"]: _any_value(a.get("value") or {}) for a in
               (rs.get("resource") or {}).get("attributes") or []}  # fmt: skip
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
            for sp in ss.get("spans") or []:
                status = sp.get("status") or {}
                out.append(
                    SpanRecord(
                        trace_id=_norm_id(sp.get("traceId"), 16),
                        span_id=_norm_id(sp.get("spanId"), 8),
                        parent_id=_norm_id(sp.get("parentSpanId"), 8) or None,
                        name=str(sp.get("name", "")),
                        start_ns=int(sp.get("startTimeUnixNano") or 0),
                        end_ns=int(sp.get("endTimeUnixNano") or 0),
                        status=_enum(status.get("code", 0), _STATUS, "STATUS_CODE_"),
                        status_message=str(status.get("message") or ""),
                        attributes={
                            a["key"]: _any_value(a.get("value") or {})
                            for a in sp.get("attributes") or []
                        },
                        kind=_enum(sp.get("kind", 1), _KINDS, "SPAN_KIND_"),
                        service=res.get("service.name"),
                    )
                )
    return out


def _pb_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _records_from_traces_data(data: TracesData) -> list[SpanRecord]:
    out = []
    for rs in data.resource_spans:
        res = {a.key: _pb_value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append(
                    SpanRecord(
                        trace_id=sp.trace_id.hex(),
                        span_id=sp.span_id.hex(),
                        parent_id=sp.parent_span_id.hex() or None,
                        name=sp.name,
                        start_ns=sp.start_time_unix_nano,
                        end_ns=sp.end_time_unix_nano,
                        status=PbStatus.StatusCode.Name(sp.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                        status_message=sp.status.message,
                        attributes={a.key: _pb_value(a.value) for a in sp.attributes},
                        kind=_KINDS.get(sp.kind, PbSpan.SpanKind.Name(sp.kind)),
                        service=res.get("service.name"),
                    )
                )
    return out


def _field1(message: bytes) -> bytes:
    """The bytes of field 1 (length-delimited) of a protobuf message: unwraps ``{trace: ...}``."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            size, i = _varint(message, i)
            if field == 1:
                return message[i : i + size]
            i += size
        elif wire == 0:
            _, i = _varint(message, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise SourceError("malformed protobuf response")
    return b""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise SourceError("malformed protobuf response")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _json_docs(text: str) -> list[dict[str, Any]]:
    """One JSON document, or several concatenated (a streamed grpc-gateway response)."""
    decoder, i = json.JSONDecoder(), 0
    docs: list[dict[str, Any]] = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        doc, i = decoder.raw_decode(text, i)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        docs.append(doc)


# -- HTTP -------------------------------------------------------------------------------------


class _Http:
    name = "backend"

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        if not url or not url.startswith(("http://", "https://")):
            raise SourceError(f"--url must be an http(s) URL for {self.name}, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(
        self, path: str, params: dict[str, Any] | None = None, accept: str = "application/json"
    ) -> bytes | None:
        """The body, or None on 404."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, headers={"Accept": accept})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body: bytes = resp.read()
                return body
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise SourceError(f"{self.name} at {self.url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SourceError(f"cannot reach {self.name} at {self.url}: {reason}") from None

    def _json(self, body: bytes) -> list[dict[str, Any]]:
        try:
            return _json_docs(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SourceError(f"malformed response from {self.name}: {exc}") from None

    def _summaries(self, traces: dict[str, list[SpanRecord]], ids: dict[str, str | None],
                   limit: int) -> list[TraceSummary]:  # fmt: skip
        wanted = {_KEYS[k]: v for k, v in ids.items() if v}
        hits = [
            TraceSummary.of(recs)
            for recs in traces.values()
            if recs and all(any(r.attributes.get(k) == v for r in recs) for k, v in wanted.items())
        ]
        hits.sort(key=lambda s: s.start_ns, reverse=True)
        return hits[:limit]


def _check_ids(ids: dict[str, str | None]) -> None:
    if not any(ids.values()):
        raise SourceError("find needs a correlation, conversation or message id")


class JaegerSource(_Http):
    """Jaeger's query API: v2's ``/api/v3`` (OTLP JSON), else v1's ``/api/traces``."""

    name = "jaeger"

    def __init__(self, url: str, service: str | None = None, lookback_s: float = 3600.0,
                 timeout: float = 10.0) -> None:  # fmt: skip
        super().__init__(url, timeout)
        self.service = service
        self.lookback_s = lookback_s

    def trace(self, trace_id: str) -> list[SpanRecord]:
        body = self._get(f"/api/v3/traces/{trace_id}")
        if body is not None:
            recs = [
                r for d in self._json(body) for r in _records_from_otlp_json(d.get("result") or d)
            ]
            if recs:
                return recs
        body = self._get(f"/api/traces/{trace_id}")
        if body is None:
            raise SourceError(f"trace {trace_id} not found in jaeger", 1)
        recs = [
            r for d in self._json(body) for t in d.get("data") or [] for r in _from_jaeger_v1(t)
        ]
        if not recs:
            raise SourceError(f"trace {trace_id} not found in jaeger", 1)
        return recs

    def find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        _check_ids(ids)
        if not self.service:
            raise SourceError("jaeger's search needs --service (the app's service.name)")
        now = datetime.now(timezone.utc)
        start = now - timedelta(seconds=self.lookback_s)
        v3 = self._get(
            "/api/v3/traces",
            {
                "query.service_name": self.service,
                "query.start_time_min": start.isoformat().replace("+00:00", "Z"),
                "query.start_time_max": now.isoformat().replace("+00:00", "Z"),
                "query.search_depth": max(limit * 5, 100),
            },
        )
        traces: dict[str, list[SpanRecord]] = {}
        if v3 is not None:
            for doc in self._json(v3):
                for r in _records_from_otlp_json(doc.get("result") or doc):
                    traces.setdefault(r.trace_id, []).append(r)
        else:
            tags = {_KEYS[k]: v for k, v in ids.items() if v}
            v1 = self._get(
                "/api/traces",
                {"service": self.service, "tags": json.dumps(tags), "limit": limit,
                 "start": int(start.timestamp() * 1e6), "end": int(now.timestamp() * 1e6)},
            )  # fmt: skip
            for doc in self._json(v1 or b"{}"):
                for t in doc.get("data") or []:
                    recs = _from_jaeger_v1(t)
                    if recs:
                        traces[recs[0].trace_id] = recs
        return self._summaries(traces, ids, limit)


def _from_jaeger_v1(trace: dict[str, Any]) -> list[SpanRecord]:
    processes = trace.get("processes") or {}
    out = []
    for sp in trace.get("spans") or []:
        tags = {t["key"]: t.get("value") for t in sp.get("tags") or []}
        parent = next(
            (r.get("spanID") for r in sp.get("references") or [] if r.get("refType") == "CHILD_OF"),
            None,
        )
        status = str(tags.pop("otel.status_code", "")).upper()
        if not status:
            status = "ERROR" if tags.get("error") is True else "UNSET"
        kind = str(tags.pop("span.kind", "internal")).upper()
        start_ns = int(sp.get("startTime", 0)) * 1000
        out.append(
            SpanRecord(
                trace_id=_norm_id(sp.get("traceID"), 16),
                span_id=_norm_id(sp.get("spanID"), 8),
                parent_id=_norm_id(parent, 8) or None,
                name=str(sp.get("operationName", "")),
                start_ns=start_ns,
                end_ns=start_ns + int(sp.get("duration", 0)) * 1000,
                status=status,
                status_message=str(tags.pop("otel.status_description", "") or ""),
                attributes=tags,
                kind=kind,
                service=(processes.get(sp.get("processID")) or {}).get("serviceName"),
            )
        )
    return out


class TempoSource(_Http):
    """Tempo's query API: ``/api/v2/traces`` (else ``/api/traces``) and TraceQL search."""

    name = "tempo"

    def __init__(self, url: str, protobuf: bool = False, lookback_s: float = 3600.0,
                 timeout: float = 10.0) -> None:  # fmt: skip
        super().__init__(url, timeout)
        self.protobuf = protobuf
        self.lookback_s = lookback_s

    def trace(self, trace_id: str) -> list[SpanRecord]:
        accept = "application/protobuf" if self.protobuf else "application/json"
        for path, wrapped in (
            (f"/api/v2/traces/{trace_id}", True),
            (f"/api/traces/{trace_id}", False),
        ):
            body = self._get(path, accept=accept)
            if body is None:
                continue
            recs = self._decode(body, wrapped)
            if recs:
                return recs
        raise SourceError(f"trace {trace_id} not found in tempo", 1)

    def _decode(self, body: bytes, wrapped: bool) -> list[SpanRecord]:
        if self.protobuf:
            try:
                # v1 answers a tempopb.Trace, field 1 = batches, which is TracesData on the wire;
                # v2 wraps it: TraceByIDResponse{trace = 1}.
                return _records_from_traces_data(
                    TracesData.FromString(_field1(body) if wrapped else body)
                )
            except Exception as exc:  # protobuf's DecodeError and friends
                raise SourceError(f"malformed protobuf response from tempo: {exc}") from None
        out = []
        for doc in self._json(body):
            out.extend(_records_from_otlp_json(doc.get("trace") or {} if wrapped else doc))
        return out

    def find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        _check_ids(ids)
        conds = " && ".join(f"span.{_KEYS[k]} = {json.dumps(v)}" for k, v in ids.items() if v)
        now = int(time.time())
        query = {
            "q": "{ " + conds + " }",
            "limit": limit,
            "start": now - int(self.lookback_s),
            "end": now,
        }
        body = self._get("/api/search", query)
        docs = self._json(body or b"{}")
        trace_ids = [_norm_id(t.get("traceID"), 16) for d in docs for t in d.get("traces") or []]
        traces = {tid: self.trace(tid) for tid in dict.fromkeys(trace_ids)}
        return self._summaries(traces, ids, limit)


def open_source(kind: str, *, url: str | None, store: str | None, service: str | None,
                lookback_s: float, protobuf: bool) -> Any:  # fmt: skip
    """The source the CLI's ``--from`` names."""
    if kind == "jaeger":
        return JaegerSource(url or "", service=service, lookback_s=lookback_s)
    if kind == "tempo":
        return TempoSource(url or "", protobuf=protobuf, lookback_s=lookback_s)
    from chatter_otel.export.store import default_store_path

    path = store or default_store_path()
    if not os.path.exists(path):
        raise SourceError(f"no trace store at {path} (run the app or `chatter-otel demo` first)")
    return LocalTraceStore(path)
