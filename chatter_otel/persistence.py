"""Usage in the app's ``messages`` and ``conversations`` rows: exactly once, off the request path.

Three parts:

* **Binding** (in the app's transaction, no SQL of ours): a ``before_flush`` hook on the app's
  sessions. When the app inserts or updates an assistant message right after a run finished in
  the same context (``last_run()``), or the message the run named (``track_workflow(message_id=
  ...)``), the message's usage columns are filled where the app left them empty or zero. After
  the app commits, the binding goes to the worker.
* **The ledger** (``chatter_usage_ledger``): one row per LLM call, keyed by span id, and
  ``chatter_usage_runs``: one row per run, keyed by workflow id. The source of truth: message and
  conversation values can always be recomputed from them.
* **The worker**: a thread with its own engine (not the app's, and its SQL is never traced)
  writes in batches. A run's tokens and cost are added to its conversation exactly once, in the
  transaction that *claims* the run row (``applied_at IS NULL`` -> now): by the binding when the
  app saved a message, or after ``grace_s`` when it saved none (streaming endpoints). When the
  database is down, batches go to a local SQLite spool, retried with backoff, and replayed after a
  restart; primary keys make every replay idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_CONVERSATION_ID,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    GenAiOperationNameValues,
)
from opentelemetry.semconv._incubating.attributes.user_attributes import USER_ID
from opentelemetry.trace import StatusCode
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    MetaData,
    Numeric,
    String,
    Table,
    and_,
    event,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from chatter_otel._lifecycle import WorkflowScopes
from chatter_otel._runs import last_run
from chatter_otel._safety import guarded, warn_once
from chatter_otel.attributes import (
    CHATTER_CORRELATION_ID,
    CHATTER_MESSAGE_ID,
    GEN_AI_USAGE_COST_AMOUNT,
    GEN_AI_USAGE_COST_CURRENCY,
    GEN_AI_USAGE_COST_SOURCE,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from chatter_otel._runs import WorkflowRun

__all__ = ["MessageMapping", "UsagePersistence"]

_log = logging.getLogger("chatter_otel")
_CHAT = GenAiOperationNameValues.CHAT.value

metadata = MetaData()
LEDGER = Table(
    "chatter_usage_ledger", metadata,
    Column("span_id", String(16), primary_key=True),
    Column("trace_id", String(32), nullable=False),
    Column("workflow_id", String(16), index=True),
    Column("conversation_id", String(256), index=True),
    Column("message_id", String(256)),
    Column("correlation_id", String(128)),
    Column("user_id", String(256)),
    Column("provider", String(64)),
    Column("model", String(256)),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("total_tokens", BigInteger),
    Column("cache_read_tokens", BigInteger),
    Column("cache_creation_tokens", BigInteger),
    Column("reasoning_tokens", BigInteger),
    Column("cost", Numeric(20, 10)),
    Column("currency", String(8)),
    Column("cost_source", String(16)),
    Column("finish_reason", String(64)),
    Column("started_at", Float),
    Column("duration_ms", Float),
    Column("status", String(16)),
)  # fmt: skip
RUNS = Table(
    "chatter_usage_runs", metadata,
    Column("workflow_id", String(16), primary_key=True),
    Column("trace_id", String(32)),
    Column("conversation_id", String(256), index=True),
    Column("message_id", String(256)),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("total_tokens", BigInteger),
    Column("cost", Numeric(20, 10)),
    Column("status", String(16)),
    Column("finished_at", Float),
    Column("applied_at", Float),
)  # fmt: skip


@dataclass(frozen=True)
class MessageMapping:
    """Where usage goes in the app's tables; the defaults are the chatter column names."""

    messages_table: str = "messages"
    conversations_table: str = "conversations"
    message_id: str = "id"
    conversation_id: str = "conversation_id"
    role: str = "role"
    assistant_roles: tuple[str, ...] = ("ASSISTANT", "assistant")
    prompt_tokens: str = "prompt_tokens"
    completion_tokens: str = "completion_tokens"
    total_tokens: str = "total_tokens"
    cost: str = "cost"
    provider: str = "provider_used"
    model: str = "model_used"
    finish_reason: str = "finish_reason"
    response_time_ms: str = "response_time_ms"
    conversation_pk: str = "id"
    conversation_total_tokens: str = "total_tokens"
    conversation_total_cost: str = "total_cost"


def _role_name(value: Any) -> str:
    return str(getattr(value, "name", value))


def _empty(value: Any) -> bool:
    return value is None or value == 0


class UsagePersistence:
    """Ledger, binding and conversation totals for one database (see the module docstring).

    ``configure(persistence=UsagePersistence("postgresql+asyncpg://..."))`` wires it: the span
    processor, the session hooks and the worker. ``flush()`` waits until queued work is written.
    """

    def __init__(
        self,
        database_url: str,
        *,
        mapping: MessageMapping | None = None,
        grace_s: float = 30.0,
        bind_window_s: float = 300.0,
        spool_path: str | os.PathLike[str] | None = None,
        batch_size: int = 500,
        max_queue: int = 50_000,
        create_tables: bool = True,
    ) -> None:
        self.database_url = database_url
        self.mapping = mapping or MessageMapping()
        self.grace_s = grace_s
        self.bind_window_s = bind_window_s
        self.batch_size = batch_size
        self.create_tables = create_tables
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        self.spool_path = Path(spool_path or Path(base) / "chatter-otel" / "usage-spool.db")
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=max_queue)
        self.stats = {"written": 0, "spooled": 0, "dropped": 0, "applied": 0, "failures": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._installed: list[Any] = []

    # -- the app's side -------------------------------------------------------------------------

    def submit(self, kind: str, record: dict[str, Any]) -> None:
        """Queue a record for the worker; never blocks (a full queue drops and counts)."""
        self._idle.clear()
        try:
            self._queue.put_nowait((kind, record))
        except queue.Full:
            self.stats["dropped"] += 1
            warn_once("ledger:full", "chatter-otel: usage ledger queue full; %d record(s) dropped",
                      self.stats["dropped"])  # fmt: skip

    def install(self, session_class: Any = Session) -> None:
        """Hook the app's sessions (all of SQLAlchemy's by default; AsyncSession included)."""
        for name, fn in (("before_flush", self._before_flush), ("after_commit", self._after_commit),
                         ("after_rollback", self._after_rollback)):  # fmt: skip
            event.listen(session_class, name, fn)
            self._installed.append((session_class, name, fn))

    def uninstall(self) -> None:
        for session_class, name, fn in self._installed:
            event.remove(session_class, name, fn)
        self._installed.clear()

    @guarded
    def _before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        m = self.mapping
        candidates = [
            o for o in (*session.new, *session.dirty)
            if getattr(getattr(o, "__table__", None), "name", None) == m.messages_table
            and _role_name(getattr(o, m.role, None)) in m.assistant_roles
        ]  # fmt: skip
        if not candidates:
            return
        run = last_run()
        for msg in candidates:
            if run is None or not self._matches(run, msg):
                continue
            self._fill(msg, run)
            u = run.usage
            session.info.setdefault("chatter_bindings", []).append(
                {
                    "workflow_id": run.workflow_id,
                    "message_id": str(getattr(msg, m.message_id)),
                    "conversation_id": getattr(msg, m.conversation_id, None),
                    # exact values, the same the message got (span attributes are floats)
                    "total_tokens": u.total_tokens,
                    "cost": u.cost,
                }
            )
            run.bound_message_id = str(getattr(msg, m.message_id))
            break  # one run, one message

    def _matches(self, run: WorkflowRun, msg: Any) -> bool:
        m = self.mapping
        if run.workflow_id is None or run.finished_at is None:
            return False
        message_id = getattr(msg, m.message_id, None)
        if run.message_id is not None:  # the run named its message
            return str(message_id) == run.message_id
        if run.bound_message_id not in (None, str(message_id)):
            return False  # already bound to another message
        if time.time() - run.finished_at > self.bind_window_s:
            return False
        conv = getattr(msg, m.conversation_id, None)
        return run.conversation_id is None or conv is None or str(conv) == run.conversation_id

    def _fill(self, msg: Any, run: WorkflowRun) -> None:
        m, u = self.mapping, run.usage
        for column, value in (
            (m.prompt_tokens, u.prompt_tokens), (m.completion_tokens, u.completion_tokens),
            (m.total_tokens, u.total_tokens), (m.cost, u.cost), (m.provider, u.provider),
            (m.model, u.model), (m.response_time_ms, u.response_time_ms),
        ):  # fmt: skip
            if value is not None and hasattr(msg, column) and _empty(getattr(msg, column)):
                setattr(msg, column, value)

    @guarded
    def _after_commit(self, session: Session) -> None:
        for binding in session.info.pop("chatter_bindings", ()):
            self.submit("bind", binding)

    @guarded
    def _after_rollback(self, session: Session) -> None:
        session.info.pop("chatter_bindings", None)

    # -- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._thread_main, name="chatter-otel-ledger",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until everything queued so far is written or spooled."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05):
                return True
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.uninstall()

    def _thread_main(self) -> None:
        with suppress_instrumentation():  # our own SQL is never traced as app work
            asyncio.run(self._main())

    async def _main(self) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(self.database_url, pool_pre_ping=True)
        spool = _Spool(self.spool_path)
        backoff, next_try, ready, next_sweep = 0.5, 0.0, False, 0.0
        try:
            while not self._stop.is_set():
                batch = await asyncio.to_thread(self._take, 0.1)
                if batch:
                    spool.add(batch)  # FIFO: new work waits behind what is spooled
                    self.stats["spooled"] = spool.size()
                if time.monotonic() < next_try:
                    continue
                try:
                    if not ready and self.create_tables:
                        async with engine.begin() as conn:
                            await conn.run_sync(metadata.create_all)
                    ready = True
                    await self._drain(engine, spool)
                    if time.monotonic() >= next_sweep:
                        await self._apply_due_runs(engine)
                        next_sweep = time.monotonic() + min(1.0, self.grace_s)
                    backoff = 0.5
                    self.stats["spooled"] = spool.size()
                    if self._queue.empty() and not spool.size():
                        self._idle.set()
                except Exception as exc:  # the database is down or refused the batch
                    self.stats["failures"] += 1
                    warn_once("ledger:db", "chatter-otel: usage ledger cannot reach the database "
                              "(%s); %d record(s) spooled at %s, retrying", type(exc).__name__,
                              spool.size(), self.spool_path)  # fmt: skip
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, 30.0)
        finally:
            spool.close()
            await engine.dispose()

    def _take(self, timeout_s: float) -> list[tuple[str, dict[str, Any]]]:
        batch: list[tuple[str, dict[str, Any]]] = []
        try:
            batch.append(self._queue.get(timeout=timeout_s))
            while len(batch) < self.batch_size:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    async def _drain(self, engine: Any, spool: _Spool) -> None:
        while True:
            rows = spool.peek(self.batch_size)
            if not rows:
                return
            async with engine.begin() as conn:
                for _, kind, record in rows:
                    await self._apply(conn, kind, record)
            spool.delete(rows[-1][0])
            self.stats["written"] += len(rows)

    async def _apply(self, conn: Any, kind: str, r: dict[str, Any]) -> None:
        if kind == "llm":
            await conn.execute(_insert_ignore(conn, LEDGER, r, "span_id"))
        elif kind == "run":
            await conn.execute(_insert_ignore(conn, RUNS, r, "workflow_id"))
        elif kind == "bind":
            await self._claim(conn, r["workflow_id"], r)

    async def _claim(self, conn: Any, workflow_id: str, bind: dict[str, Any] | None) -> None:
        """Apply a run's tokens and cost to its conversation, once: whoever claims it first."""
        row = (await conn.execute(select(RUNS).where(RUNS.c.workflow_id == workflow_id))).first()
        if row is None or row.applied_at is not None:
            return
        bind = bind or {}
        message_id, conversation_id = bind.get("message_id"), bind.get("conversation_id")
        tokens = bind.get("total_tokens", row.total_tokens)
        cost = bind.get("cost", row.cost)
        claimed = await conn.execute(
            update(RUNS)
            .where(and_(RUNS.c.workflow_id == workflow_id, RUNS.c.applied_at.is_(None)))
            .values(applied_at=time.time(), message_id=message_id or row.message_id)
        )
        conv = conversation_id or row.conversation_id
        if claimed.rowcount != 1 or conv is None or not (tokens or cost):
            return
        m = self.mapping
        await conn.execute(
            text(
                f'UPDATE "{m.conversations_table}" SET '
                f'"{m.conversation_total_tokens}" = "{m.conversation_total_tokens}" + :tokens, '
                f'"{m.conversation_total_cost}" = "{m.conversation_total_cost}" + :cost '
                f'WHERE "{m.conversation_pk}" = :conv'
            ),
            {"tokens": tokens or 0, "cost": cost or Decimal(0), "conv": str(conv)},
        )
        self.stats["applied"] += 1

    async def _apply_due_runs(self, engine: Any) -> None:
        """Runs no message took within the grace period (streaming endpoints)."""
        cutoff = time.time() - self.grace_s
        async with engine.begin() as conn:
            due = (
                await conn.execute(
                    select(RUNS.c.workflow_id).where(
                        and_(RUNS.c.applied_at.is_(None), RUNS.c.finished_at < cutoff)
                    ).limit(self.batch_size)
                )
            ).scalars().all()  # fmt: skip
            for workflow_id in due:
                await self._claim(conn, workflow_id, None)


def _insert_ignore(conn: Any, table: Table, values: dict[str, Any], key: str) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
    return table.insert().prefix_with("IGNORE").values(**values)


class _Spool:
    """A local SQLite file of pending records, in order; survives a restart."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " kind TEXT NOT NULL, payload TEXT NOT NULL)"
        )
        self._db.commit()

    def add(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT INTO spool (kind, payload) VALUES (?, ?)",
                [(kind, json.dumps(r, default=str)) for kind, r in batch],
            )

    def peek(self, n: int) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self._db.execute(
            "SELECT id, kind, payload FROM spool ORDER BY id LIMIT ?", (n,)
        ).fetchall()
        return [(i, kind, _decode(json.loads(p))) for i, kind, p in rows]

    def delete(self, upto: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM spool WHERE id <= ?", (upto,))

    def size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    if record.get("cost") is not None:
        record["cost"] = Decimal(str(record["cost"]))
    return record


class LedgerSpanProcessor(SpanProcessor):
    """``chat`` spans -> ledger records; outermost workflow spans -> run records."""

    def __init__(self, persistence: UsagePersistence | None) -> None:
        self.persistence = persistence
        self._scopes = WorkflowScopes()

    def repoint(self, persistence: UsagePersistence | None) -> None:
        self.persistence = persistence

    def detach(self) -> None:
        self.persistence = None
        self._scopes.clear()

    @guarded
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self._scopes.enter(span)

    @guarded
    def on_end(self, span: ReadableSpan) -> None:
        workflow_id, closes = self._scopes.leave(span)
        persistence = self.persistence
        if persistence is None:
            return
        a = span.attributes or {}
        ok = span.status.status_code is not StatusCode.ERROR
        if a.get(GEN_AI_OPERATION_NAME) == _CHAT:
            tin, tout = a.get(GEN_AI_USAGE_INPUT_TOKENS), a.get(GEN_AI_USAGE_OUTPUT_TOKENS)
            reasons = a.get(GEN_AI_RESPONSE_FINISH_REASONS) or ()
            persistence.submit("llm", {
                "span_id": format(span.context.span_id, "016x"),
                "trace_id": format(span.context.trace_id, "032x"),
                "workflow_id": workflow_id,
                "conversation_id": a.get(GEN_AI_CONVERSATION_ID),
                "message_id": a.get(CHATTER_MESSAGE_ID),
                "correlation_id": a.get(CHATTER_CORRELATION_ID),
                "user_id": a.get(USER_ID),
                "provider": a.get(GEN_AI_PROVIDER_NAME),
                "model": a.get(GEN_AI_RESPONSE_MODEL) or a.get(GEN_AI_REQUEST_MODEL),
                "input_tokens": tin, "output_tokens": tout,
                "total_tokens": None if tin is None and tout is None else (tin or 0) + (tout or 0),
                "cache_read_tokens": a.get(GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS),
                "cache_creation_tokens": a.get(GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS),
                "reasoning_tokens": a.get(GEN_AI_USAGE_REASONING_OUTPUT_TOKENS),
                "cost": a.get(GEN_AI_USAGE_COST_AMOUNT),
                "currency": a.get(GEN_AI_USAGE_COST_CURRENCY),
                "cost_source": a.get(GEN_AI_USAGE_COST_SOURCE),
                "finish_reason": reasons[0] if reasons else None,
                "started_at": (span.start_time or 0) / 1e9,
                "duration_ms": ((span.end_time or 0) - (span.start_time or 0)) / 1e6,
                "status": "ok" if ok else "error",
            })  # fmt: skip
        if closes:
            tin, tout = a.get(GEN_AI_USAGE_INPUT_TOKENS), a.get(GEN_AI_USAGE_OUTPUT_TOKENS)
            cost = a.get(GEN_AI_USAGE_COST_AMOUNT)
            persistence.submit("run", {
                "workflow_id": workflow_id,
                "trace_id": format(span.context.trace_id, "032x"),
                "conversation_id": a.get(GEN_AI_CONVERSATION_ID),
                "message_id": a.get(CHATTER_MESSAGE_ID),
                "input_tokens": tin, "output_tokens": tout,
                "total_tokens": None if tin is None and tout is None else (tin or 0) + (tout or 0),
                "cost": Decimal(str(cost)) if cost is not None else None,
                "status": "ok" if ok else "error",
                "finished_at": (span.end_time or 0) / 1e9,
                "applied_at": None,
            })  # fmt: skip
