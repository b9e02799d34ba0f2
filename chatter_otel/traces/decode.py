"""Trace backends' response shapes -> ``SpanRecord``: trace ids in hex or base64, OTLP JSON
(hex or base64 ids), OTLP protobuf, concatenated JSON documents. Failures raise ``SourceError``
with one clear line."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from chatter_otel.traces.spans import SpanRecord

__all__ = ["SourceError", "normalize_trace_id"]

_HEX = re.compile(r"[0-9a-fA-F]+")
_KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


class SourceError(Exception):
    """A backend could not answer: ``code`` 1 for not found, 2 for anything else."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def norm_id(value: Any, nbytes: int) -> str:
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


def records_from_otlp_json(doc: dict[str, Any]) -> list[SpanRecord]:
    out = []
    for rs in doc.get("resourceSpans") or doc.get("batches") or []:
        res = {a["key"]: _any_value(a.get("value") or {}) for a in
               (rs.get("resource") or {}).get("attributes") or []}  # fmt: skip
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
            for sp in ss.get("spans") or []:
                status = sp.get("status") or {}
                out.append(
                    SpanRecord(
                        trace_id=norm_id(sp.get("traceId"), 16),
                        span_id=norm_id(sp.get("spanId"), 8),
                        parent_id=norm_id(sp.get("parentSpanId"), 8) or None,
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


def records_from_traces_data(data: TracesData) -> list[SpanRecord]:
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


def field1(message: bytes) -> bytes:
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


def json_docs(text: str) -> list[dict[str, Any]]:
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


# -- what reaches the renderer -----------------------------------------------------------------

_MAX_NS = 2**63 - 1
_STATUSES = frozenset({"OK", "ERROR", "UNSET"})
_MAX_ATTRS = 256
_MAX_TEXT = 4096
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(value: Any, limit: int) -> str:
    return _CONTROL.sub("?", value if isinstance(value, str) else str(value))[:limit]


def _scalar(value: Any) -> Any:
    if isinstance(value, bool | int):
        return value if -(2**63) <= value < 2**64 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _text(value, _MAX_TEXT)
    return None


def _attribute(value: Any) -> Any:
    if isinstance(value, list):
        items = [_scalar(v) for v in value[:_MAX_ATTRS]]
        return [v for v in items if v is not None]
    return _scalar(value)


def _hex_id(value: Any, length: int, what: str) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value):
        raise SourceError(f"malformed {what} in the response")
    return value.lower()


def _time(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_NS:
        raise SourceError("malformed span time in the response")
    return value


def clean_record(rec: SpanRecord) -> SpanRecord:
    """``rec`` with every field of the type and size the renderer expects: ids checked (a bad one
    is a ``SourceError``), texts cut and stripped of control characters, attributes kept only
    as scalars or lists of scalars. Whatever a backend sends, what is printed is well-formed."""
    attrs: dict[str, Any] = {}
    source = rec.attributes if isinstance(rec.attributes, dict) else {}
    for key, value in list(source.items())[:_MAX_ATTRS]:
        clean = _attribute(value)
        if clean is not None:
            attrs[_text(key, 256)] = clean
    start = _time(rec.start_ns)
    status = rec.status.upper() if isinstance(rec.status, str) else "UNSET"
    return SpanRecord(
        trace_id=_hex_id(rec.trace_id, 32, "trace id"),
        span_id=_hex_id(rec.span_id, 16, "span id"),
        parent_id=_hex_id(rec.parent_id, 16, "parent span id") if rec.parent_id else None,
        name=_text(rec.name, 512),
        start_ns=start,
        end_ns=max(_time(rec.end_ns), start),
        status=status if status in _STATUSES else "UNSET",
        status_message=_text(rec.status_message or "", 512),
        attributes=attrs,
        kind=_text(rec.kind, 16),
        service=_text(rec.service, 256) if rec.service is not None else None,
    )


def records_from_jaeger_v1(trace: dict[str, Any]) -> list[SpanRecord]:
    """Jaeger v1's JSON (``/api/traces``): tags, ``CHILD_OF`` references, microseconds."""
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
                trace_id=norm_id(sp.get("traceID"), 16),
                span_id=norm_id(sp.get("spanID"), 8),
                parent_id=norm_id(parent, 8) or None,
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
