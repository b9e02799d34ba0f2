"""The Jaeger and Tempo query APIs, as ``trace`` / ``find`` sources (see ``sources``)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from chatter_otel.attributes import CHATTER_CORRELATION_ID, CHATTER_MESSAGE_ID
from chatter_otel.export.store import TraceSummary
from chatter_otel.traces.decode import (
    SourceError,
    clean_record,
    field1,
    json_docs,
    norm_id,
    records_from_jaeger_v1,
    records_from_otlp_json,
    records_from_traces_data,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from chatter_otel.traces.spans import SpanRecord

__all__ = ["Connection", "JaegerSource", "TempoSource"]

T = TypeVar("T")
MAX_RESPONSE_BYTES = 32 * 2**20  # a trace or a search page; a 200 MB answer is an error

_KEYS = {  # the ids `find` can look for, and their span attribute
    "correlation_id": CHATTER_CORRELATION_ID,
    "conversation_id": "gen_ai.conversation.id",
    "message_id": CHATTER_MESSAGE_ID,
}


@dataclass(frozen=True)
class Connection:
    """How to reach a secured backend: extra request headers (``Authorization``, a tenant),
    a CA bundle for its certificate (else the system's, which ``SSL_CERT_FILE`` can point
    elsewhere), or ``insecure`` (no certificate check: a loopback tunnel, a test backend)."""

    headers: dict[str, str] = field(default_factory=dict)
    ca_bundle: str | None = None
    insecure: bool = False

    def verify(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        try:
            return ssl.create_default_context(cafile=self.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot read the CA bundle {self.ca_bundle}: {exc}") from None


class _Http:
    """A backend's HTTP API through httpx, within one deadline per command (``timeout_s``:
    connecting, TLS, headers and a body trickled a byte at a time all count) and a response
    size cap (``max_bytes``, read as it streams); its parsers are total: whatever comes back is
    records or a ``SourceError`` (one line, exit 2), never a traceback."""

    name = "backend"

    def __init__(
        self, url: str, timeout_s: float = 30.0, max_bytes: int = MAX_RESPONSE_BYTES,
        connection: Connection | None = None,
    ) -> None:  # fmt: skip
        if not url or not url.startswith(("http://", "https://")):
            raise SourceError(f"--url must be an http(s) URL for {self.name}, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.connection = connection or Connection()
        self._verify = self.connection.verify()
        self._deadline = time.monotonic() + timeout_s

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return self._total(lambda: [clean_record(r) for r in self._trace(trace_id)])

    def find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        return self._total(lambda: self._find(limit=limit, **ids))

    def recent(self, *, limit: int = 20, since_ns: int | None = None, errors: bool = False,
               model: str | None = None, conversation_id: str | None = None,
               ) -> list[TraceSummary]:  # fmt: skip
        """``chatter-otel ls`` against the backend: its search, newest first."""
        return self._total(lambda: self._recent(
            limit=limit, since_ns=since_ns, errors=errors, model=model,
            conversation_id=conversation_id))  # fmt: skip

    def _recent(self, *, limit: int, since_ns: int | None, errors: bool, model: str | None,
                conversation_id: str | None) -> list[TraceSummary]:  # fmt: skip
        raise NotImplementedError

    def _trace(self, trace_id: str) -> list[SpanRecord]:
        raise NotImplementedError

    def _find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        raise NotImplementedError

    def _total(self, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except SourceError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError,
                OverflowError, UnicodeError, DecodeError) as exc:  # fmt: skip
            raise SourceError(
                f"malformed response from {self.name} at {self.url} ({type(exc).__name__})"
            ) from None

    def _get(
        self, path: str, params: dict[str, Any] | None = None, accept: str = "application/json"
    ) -> bytes | None:
        """The body, or None on 404; within the command's deadline and the size cap."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise SourceError(f"{self.name} at {self.url} did not answer within "
                              f"{self.timeout_s:g} s (--timeout)")  # fmt: skip
        result: list[bytes | BaseException | None] = []
        # A worker thread, joined with the time left: the deadline holds whatever phase the
        # backend stalls in (httpx's timeouts are per phase and per read, not per request).
        worker = threading.Thread(
            target=self._fetch, args=(path, params, accept, remaining, result), daemon=True
        )
        worker.start()
        worker.join(remaining)
        if not result:
            raise SourceError(f"{self.name} at {self.url} did not answer within "
                              f"{self.timeout_s:g} s (--timeout)")  # fmt: skip
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _fetch(self, path: str, params: dict[str, Any] | None, accept: str, timeout: float,
               result: list[Any]) -> None:  # fmt: skip
        import httpx  # only the backends need it: ls, trace and find on the store start lighter

        headers = {**self.connection.headers, "Accept": accept}
        try:
            with (
                httpx.Client(verify=self._verify, timeout=timeout, follow_redirects=True) as http,
                http.stream("GET", self.url + path, params=params, headers=headers) as resp,
            ):
                if resp.status_code == 404:
                    result.append(None)
                    return
                if resp.status_code >= 400:
                    code = resp.status_code
                    hint = " (check --header)" if code in (401, 403) else ""
                    answer = f"{self.name} at {self.url} answered HTTP {code}{hint}"
                    result.append(SourceError(answer))
                    return
                chunks, size = [], 0
                for chunk in resp.iter_raw(65536):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise SourceError(f"{self.name} at {self.url} sent more than "
                                          f"{self.max_bytes // 2**20} MiB")  # fmt: skip
                    chunks.append(chunk)
                result.append(b"".join(chunks))
        except SourceError as exc:
            result.append(exc)
        except Exception as exc:  # connection refused, TLS, timeouts, protocol errors
            reason = _reason(exc)
            result.append(SourceError(f"cannot reach {self.name} at {self.url}: {reason}"))

    def _json(self, body: bytes) -> list[dict[str, Any]]:
        try:
            return json_docs(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise SourceError(
                f"malformed response from {self.name}: {type(exc).__name__}"
            ) from None

    def _summaries(self, traces: dict[str, list[SpanRecord]], ids: dict[str, str | None],
                   limit: int) -> list[TraceSummary]:  # fmt: skip
        wanted = {_KEYS[k]: v for k, v in ids.items() if v}
        cleaned = [[clean_record(r) for r in recs] for recs in traces.values()]
        hits = [
            TraceSummary.of(recs)
            for recs in cleaned
            if recs and all(any(r.attributes.get(k) == v for r in recs) for k, v in wanted.items())
        ]
        hits.sort(key=lambda s: s.start_ns, reverse=True)
        return hits[:limit]


def _reason(exc: Exception) -> str:
    """What went wrong, in words (a certificate one says how to trust it)."""
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc.__context__, ssl.SSLError):
        return f"{text} (--ca-bundle FILE trusts its CA; --insecure skips the check)"
    return text


def _matching(traces: dict[str, list[SpanRecord]], limit: int, errors: bool, model: str | None,
              conversation_id: str | None) -> list[TraceSummary]:  # fmt: skip
    """``ls``'s filters over what a search returned (a backend may filter less than asked)."""
    out = []
    for recs in traces.values():
        cleaned = [clean_record(r) for r in recs]
        if not cleaned:
            continue
        t = TraceSummary.of(cleaned)
        models = {r.attributes.get(k) for r in cleaned
                  for k in ("gen_ai.request.model", "gen_ai.response.model")}  # fmt: skip
        if ((errors and t.status != "ERROR") or (model and model not in models)
                or (conversation_id and not any(r.attributes.get("gen_ai.conversation.id")
                                                == conversation_id for r in cleaned))):  # fmt: skip
            continue
        out.append(t)
    out.sort(key=lambda t: t.start_ns, reverse=True)
    return out[:limit]


def _check_ids(ids: dict[str, str | None]) -> None:
    if not any(ids.values()):
        raise SourceError("find needs a correlation, conversation or message id")


class JaegerSource(_Http):
    """Jaeger's query API: v2's ``/api/v3`` (OTLP JSON), else v1's ``/api/traces``."""

    name = "jaeger"

    def __init__(self, url: str, service: str | None = None, lookback_s: float = 3600.0, *,
                 timeout_s: float = 30.0, max_bytes: int = MAX_RESPONSE_BYTES,
                 connection: Connection | None = None) -> None:  # fmt: skip
        super().__init__(url, timeout_s, max_bytes, connection)
        self.service = service
        self.lookback_s = lookback_s

    def _trace(self, trace_id: str) -> list[SpanRecord]:
        body = self._get(f"/api/v3/traces/{trace_id}")
        if body is not None:
            recs = [
                r for d in self._json(body) for r in records_from_otlp_json(d.get("result") or d)
            ]
            if recs:
                return recs
        body = self._get(f"/api/traces/{trace_id}")
        if body is None:
            raise SourceError(f"trace {trace_id} not found in jaeger", 1)
        recs = [
            r
            for d in self._json(body)
            for t in d.get("data") or []
            for r in records_from_jaeger_v1(t)
        ]
        if not recs:
            raise SourceError(f"trace {trace_id} not found in jaeger", 1)
        return recs

    def _find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        _check_ids(ids)
        tags = {_KEYS[k]: v for k, v in ids.items() if v}
        return self._summaries(self._search(tags, limit, None), ids, limit)

    def _recent(self, *, limit: int, since_ns: int | None, errors: bool, model: str | None,
                conversation_id: str | None) -> list[TraceSummary]:  # fmt: skip
        tags: dict[str, str] = {}
        if errors:
            tags["error"] = "true"  # how Jaeger tags a span whose status is ERROR
        if conversation_id:
            tags["gen_ai.conversation.id"] = conversation_id
        if model:
            tags["gen_ai.request.model"] = model
        traces = self._search(tags, limit, since_ns)
        return _matching(traces, limit, errors, model, conversation_id)

    def _search(self, tags: dict[str, str], limit: int, since_ns: int | None,
                ) -> dict[str, list[SpanRecord]]:  # fmt: skip
        """Jaeger filters by tag on the server only in its v1 search (``/api/traces?tags=``,
        what its UI uses, still served by Jaeger v2); v3's HTTP search takes no attributes, so
        it is the fallback, filtered by the caller (``query.num_traces`` deep)."""
        if not self.service:
            raise SourceError("jaeger's search needs --service (the app's service.name)")
        now = datetime.now(UTC)
        start = now - timedelta(seconds=self.lookback_s)
        if since_ns is not None:
            start = max(start, datetime.fromtimestamp(since_ns / 1e9, tz=UTC))
        traces: dict[str, list[SpanRecord]] = {}
        v1 = self._get(
            "/api/traces",
            {"service": self.service, "tags": json.dumps(tags), "limit": limit,
             "start": int(start.timestamp() * 1e6), "end": int(now.timestamp() * 1e6)},
        )  # fmt: skip
        if v1 is not None:
            for doc in self._json(v1):
                for t in doc.get("data") or []:
                    recs = records_from_jaeger_v1(t)
                    if recs:
                        traces[recs[0].trace_id] = recs
            return traces
        v3 = self._get(
            "/api/v3/traces",
            {
                "query.service_name": self.service,
                "query.start_time_min": start.isoformat().replace("+00:00", "Z"),
                "query.start_time_max": now.isoformat().replace("+00:00", "Z"),
                "query.num_traces": max(limit * 5, 100),
            },
        )
        for doc in self._json(v3 or b"{}"):
            for r in records_from_otlp_json(doc.get("result") or doc):
                traces.setdefault(r.trace_id, []).append(r)
        return traces


class TempoSource(_Http):
    """Tempo's query API: ``/api/v2/traces`` (else ``/api/traces``) and TraceQL search."""

    name = "tempo"

    def __init__(self, url: str, protobuf: bool = False, lookback_s: float = 3600.0, *,
                 timeout_s: float = 30.0, max_bytes: int = MAX_RESPONSE_BYTES,
                 connection: Connection | None = None) -> None:  # fmt: skip
        super().__init__(url, timeout_s, max_bytes, connection)
        self.protobuf = protobuf
        self.lookback_s = lookback_s

    def _trace(self, trace_id: str) -> list[SpanRecord]:
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
                return records_from_traces_data(
                    TracesData.FromString(field1(body) if wrapped else body)
                )
            except Exception as exc:  # protobuf's DecodeError and friends
                raise SourceError(
                    f"malformed protobuf response from tempo ({type(exc).__name__})"
                ) from None
        out = []
        for doc in self._json(body):
            out.extend(records_from_otlp_json(doc.get("trace") or {} if wrapped else doc))
        return out

    def _find(self, *, limit: int = 20, **ids: str | None) -> list[TraceSummary]:
        _check_ids(ids)
        conds = [f"span.{_KEYS[k]} = {json.dumps(v)}" for k, v in ids.items() if v]
        return self._summaries(self._search(conds, limit, None), ids, limit)

    def _recent(self, *, limit: int, since_ns: int | None, errors: bool, model: str | None,
                conversation_id: str | None) -> list[TraceSummary]:  # fmt: skip
        conds = ["status = error"] if errors else []
        if conversation_id:
            conds.append(f"span.gen_ai.conversation.id = {json.dumps(conversation_id)}")
        if model:
            conds.append(f"span.gen_ai.request.model = {json.dumps(model)}")
        traces = self._search(conds, limit, since_ns)
        return _matching(traces, limit, errors, model, conversation_id)

    def _search(self, conds: list[str], limit: int, since_ns: int | None,
                ) -> dict[str, list[SpanRecord]]:  # fmt: skip
        """TraceQL search (``{ }`` when there is nothing to match: every trace), then each
        trace it names."""
        now = int(time.time())
        start = now - int(self.lookback_s)
        if since_ns is not None:
            start = max(start, since_ns // 10**9)
        query = {"q": "{ " + " && ".join(conds) + " }", "limit": limit, "start": start,
                 "end": now}  # fmt: skip
        body = self._get("/api/search", query)
        docs = self._json(body or b"{}")
        trace_ids = [norm_id(t.get("traceID"), 16) for d in docs for t in d.get("traces") or []]
        return {tid: self.trace(tid) for tid in dict.fromkeys(trace_ids)}
