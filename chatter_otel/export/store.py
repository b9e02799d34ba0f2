"""The local trace store: finished spans in a SQLite file, the embedded default exporter.

Spans reach it through ``LocalStoreExporter`` behind the SDK's ``BatchSpanProcessor``, so writes
happen on the processor's worker thread, never on the request path. Rows are keyed by
(trace id, span id), so a retried batch is written once. Retention keeps at most ``max_spans``
spans and none older than ``max_age_s``; it runs every few batches. WAL mode lets the CLI read
while the app writes.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_CONVERSATION_ID,
    GEN_AI_OPERATION_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GenAiOperationNameValues,
)

from chatter_otel._forksafe import fresh_after_fork, in_child_after_fork
from chatter_otel._sqlite import connect_wal
from chatter_otel.attributes import (
    CHATTER_CORRELATION_ID,
    CHATTER_MESSAGE_ID,
    GEN_AI_USAGE_COST_AMOUNT,
)
from chatter_otel.traces.spans import SpanRecord, from_readable

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["LocalStoreExporter", "LocalTraceStore", "TraceSummary", "default_store_path"]

_log = logging.getLogger("chatter_otel")

ENV_STORE = "CHATTER_OTEL_TRACE_STORE"
_PRUNE_EVERY = 32  # batches
_CHAT = GenAiOperationNameValues.CHAT.value

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_id TEXT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT NOT NULL,
    service TEXT,
    correlation_id TEXT,
    conversation_id TEXT,
    message_id TEXT,
    attributes TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
CREATE INDEX IF NOT EXISTS spans_correlation ON spans (correlation_id);
CREATE INDEX IF NOT EXISTS spans_conversation ON spans (conversation_id);
CREATE INDEX IF NOT EXISTS spans_message ON spans (message_id);
CREATE INDEX IF NOT EXISTS spans_errors ON spans (start_ns) WHERE status = 'ERROR';
"""
_COLUMNS = (
    "trace_id, span_id, parent_id, name, kind, start_ns, end_ns, status, status_message,"
    " service, attributes"
)


def default_store_path() -> Path:
    """``$CHATTER_OTEL_TRACE_STORE``, else ``$XDG_DATA_HOME/chatter-otel/traces.db``."""
    env = os.environ.get(ENV_STORE)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "chatter-otel" / "traces.db"


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One trace in a ``find`` listing."""

    trace_id: str
    root_name: str
    start_ns: int
    duration_ms: float
    status: str
    input_tokens: int | None
    output_tokens: int | None
    cost: float | None
    correlation_id: str | None
    conversation_id: str | None
    model: str | None = None  # the first LLM call's (response, else request) model

    @classmethod
    def of(cls, records: Sequence[SpanRecord]) -> TraceSummary:
        ids = {r.span_id for r in records}
        roots = [r for r in records if r.parent_id not in ids] or list(records)
        root = min(roots, key=lambda r: r.start_ns)
        chats = [r for r in records if r.attributes.get(GEN_AI_OPERATION_NAME) == _CHAT]

        def total(key: str) -> Any:
            values = [
                v for r in chats
                if isinstance(v := r.attributes.get(key), int | float) and not isinstance(v, bool)
            ]  # fmt: skip
            return sum(values) if values else None

        def first(key: str) -> Any:
            return next((r.attributes[key] for r in records if r.attributes.get(key)), None)

        return cls(
            trace_id=root.trace_id,
            root_name=root.name,
            start_ns=min(r.start_ns for r in records),
            duration_ms=(max(r.end_ns for r in records) - min(r.start_ns for r in records)) / 1e6,
            status="ERROR" if any(r.status == "ERROR" for r in records) else "OK",
            input_tokens=total(GEN_AI_USAGE_INPUT_TOKENS),
            output_tokens=total(GEN_AI_USAGE_OUTPUT_TOKENS),
            cost=total(GEN_AI_USAGE_COST_AMOUNT),
            correlation_id=first(CHATTER_CORRELATION_ID),
            conversation_id=first(GEN_AI_CONVERSATION_ID),
            model=_first_model(chats),
        )


def _first_model(chats: Sequence[SpanRecord]) -> str | None:
    for r in sorted(chats, key=lambda r: r.start_ns):
        model = r.attributes.get(GEN_AI_RESPONSE_MODEL) or r.attributes.get(GEN_AI_REQUEST_MODEL)
        if model:
            return str(model)
    return None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class LocalTraceStore:
    """Spans in one SQLite file; thread-safe; bounded by count and age."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        max_spans: int = 200_000,
        max_age_s: float = 7 * 86_400,
    ) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.max_spans = max_spans
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
        self._conn: sqlite3.Connection | None = None
        self._writes = 0
        # SQLite's rule: a connection opened before a fork is not used in the child. The child
        # opens its own on first use and keeps the inherited one unused, never closed: closing
        # it there could touch the file state the parent's connection still relies on.
        self._inherited: sqlite3.Connection | None = None
        in_child_after_fork(self._reopen_in_child)

    def _reopen_in_child(self) -> None:
        if self._conn is not None:
            self._inherited, self._conn = self._conn, None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect_wal(self.path, timeout_s=10, schema=_SCHEMA, check_same_thread=False)
            self._conn = conn
        return self._conn

    def write(self, records: Iterable[SpanRecord]) -> int:
        rows = [
            (
                r.trace_id, r.span_id, r.parent_id, r.name, r.kind, r.start_ns, r.end_ns,
                r.status, r.status_message, r.service,
                r.attributes.get(CHATTER_CORRELATION_ID),
                r.attributes.get(GEN_AI_CONVERSATION_ID),
                r.attributes.get(CHATTER_MESSAGE_ID),
                json.dumps({k: _jsonable(v) for k, v in r.attributes.items()}, default=str),
            )
            for r in records
        ]  # fmt: skip
        with self._lock:
            db = self._db()
            with db:
                db.executemany(
                    "INSERT OR REPLACE INTO spans (" + _COLUMNS.replace(", attributes", "")
                    + ", correlation_id, conversation_id, message_id, attributes)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )  # fmt: skip
            self._writes += 1
            # The count cap is exact after every write (one COUNT per batch, a few ms at the
            # cap); the age cut rides along every _PRUNE_EVERY batches.
            self._prune(db, by_age=self._writes % _PRUNE_EVERY == 1)
        return len(rows)

    def _prune(self, db: sqlite3.Connection, *, by_age: bool = True) -> None:
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        with db:
            if by_age:
                db.execute("DELETE FROM spans WHERE start_ns < ?", (cutoff,))
            (count,) = db.execute("SELECT COUNT(*) FROM spans").fetchone()
            if count > self.max_spans:
                db.execute(
                    "DELETE FROM spans WHERE rowid IN"
                    " (SELECT rowid FROM spans ORDER BY start_ns LIMIT ?)",
                    (count - self.max_spans,),
                )

    def prune(self) -> None:
        """Apply retention now."""
        with self._lock:
            self._prune(self._db())

    def _records(self, where: str, args: Sequence[Any]) -> list[SpanRecord]:
        with self._lock:
            rows = (
                self._db()
                .execute(f"SELECT {_COLUMNS} FROM spans WHERE {where} ORDER BY start_ns", args)
                .fetchall()
            )
        return [
            SpanRecord(
                trace_id=r[0], span_id=r[1], parent_id=r[2], name=r[3], kind=r[4],
                start_ns=r[5], end_ns=r[6], status=r[7], status_message=r[8], service=r[9],
                attributes=json.loads(r[10]),
            )
            for r in rows
        ]  # fmt: skip

    def trace(self, trace_id: str) -> list[SpanRecord]:
        """Every stored span of one trace (32-hex id), in start order; [] when unknown."""
        return self._records("trace_id = ?", (trace_id.lower(),))

    def find(
        self,
        *,
        correlation_id: str | None = None,
        conversation_id: str | None = None,
        message_id: str | None = None,
        limit: int = 20,
    ) -> list[TraceSummary]:
        """Traces having a span with all the given ids, newest first."""
        clauses, args = [], []
        for column, value in (
            ("correlation_id", correlation_id),
            ("conversation_id", conversation_id),
            ("message_id", message_id),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if not clauses:
            raise ValueError("find needs a correlation, conversation or message id")
        with self._lock:
            ids = [
                row[0]
                for row in self._db().execute(
                    f"SELECT trace_id FROM spans WHERE {' AND '.join(clauses)}"
                    " GROUP BY trace_id ORDER BY MIN(start_ns) DESC LIMIT ?",
                    (*args, limit),
                )
            ]
        return [TraceSummary.of(self.trace(t)) for t in ids]

    def recent(
        self, *, limit: int = 20, since_ns: int | None = None, errors: bool = False,
        model: str | None = None, conversation_id: str | None = None,
    ) -> list[TraceSummary]:  # fmt: skip
        """The traces with the newest spans matching the filters, newest first (``errors``:
        traces with a failed span; ``model``: a span asking or answered by it). Walks the
        spans newest first by index and stops at ``limit`` traces: as fast on a million spans
        as on a thousand."""
        clauses: list[str] = ["1"]
        args: list[Any] = []
        if errors:
            clauses.append("status = 'ERROR'")  # the partial index spans_errors
        if since_ns is not None:
            clauses.append("start_ns >= ?")
            args.append(since_ns)
        if conversation_id is not None:
            clauses.append("conversation_id = ?")
            args.append(conversation_id)
        if model is not None:
            asked, answered = (
                f"json_extract(attributes, '$.\"{key}\"')"
                for key in (GEN_AI_REQUEST_MODEL, GEN_AI_RESPONSE_MODEL)
            )
            clauses.append(f"({asked} = ? OR {answered} = ?)")
            args += [model, model]
        ids: dict[str, None] = {}
        with self._lock:
            cursor = self._db().execute(
                f"SELECT trace_id FROM spans WHERE {' AND '.join(clauses)} ORDER BY start_ns DESC",
                args,
            )  # fmt: skip
            for (trace_id,) in cursor:
                ids.setdefault(trace_id)
                if len(ids) >= limit:
                    break
            cursor.close()
        found = [TraceSummary.of(spans) for t in ids if (spans := self.trace(t))]
        return sorted(found, key=lambda t: t.start_ns, reverse=True)

    def ended_since(self, rowid: int) -> tuple[int, list[TraceSummary]]:
        """Traces whose root span (no parent, or one not in the store) was written after
        ``rowid``, oldest first, and the last rowid seen: what ``chatter-otel tail`` polls."""
        with self._lock:
            rows = self._db().execute(
                "SELECT rowid, trace_id, parent_id FROM spans WHERE rowid > ? ORDER BY rowid",
                (rowid,),
            ).fetchall()  # fmt: skip
        last, roots = rowid, dict[str, None]()
        for row_id, trace_id, parent_id in rows:
            last = max(last, row_id)
            if parent_id is None:
                roots.setdefault(trace_id)
        found = [TraceSummary.of(spans) for t in roots if (spans := self.trace(t))]
        return last, found

    def trace_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Trace ids starting with ``prefix`` (lower-case hex), at most ``limit``, by index."""
        upper = prefix + "g"  # every hex digit sorts below "g"
        with self._lock:
            rows = self._db().execute(
                "SELECT DISTINCT trace_id FROM spans WHERE trace_id >= ? AND trace_id < ? LIMIT ?",
                (prefix, upper, limit),
            ).fetchall()  # fmt: skip
        return [r[0] for r in rows]

    def last_rowid(self) -> int:
        with self._lock:
            (last,) = self._db().execute("SELECT COALESCE(MAX(rowid), 0) FROM spans").fetchone()
        return int(last)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class LocalStoreExporter(SpanExporter):
    """A ``SpanExporter`` into a ``LocalTraceStore``; use it behind ``BatchSpanProcessor``."""

    def __init__(self, store: LocalTraceStore | None = None) -> None:
        # No argument: the default store ($CHATTER_OTEL_TRACE_STORE), as the SDK makes the
        # exporters OTEL_TRACES_EXPORTER names (``chatter_local``, an entry point).
        self.store = store if store is not None else LocalTraceStore()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.store.write(from_readable(s) for s in spans)
        except (sqlite3.Error, OSError) as exc:
            _log.warning(
                "chatter-otel: could not write %d spans to %s: %s", len(spans), self.store.path,
                exc,
            )  # fmt: skip
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.store.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
