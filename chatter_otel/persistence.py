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
* **The worker**: a thread with its own engine and event loop (not the app's, and its SQL is
  never traced) writes in batches (``batch_delay_s``, ``batch_size``; ``flush()`` writes now).
  A run's tokens and cost are added to its conversation exactly once, in the transaction that
  *claims* the run row (``applied_at IS NULL`` -> now): by the binding when the app saved a
  message, or after ``grace_s`` when it saved none (streaming endpoints). Every record passes
  through a local SQLite spool; when the database is down it stays there, retried with backoff,
  and is replayed after a restart; primary keys make every replay idempotent. A record the
  database refuses while it is up is set aside in the spool's ``quarantine`` table (logged and
  counted) so that the records behind it keep flowing.
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
import weakref
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Observation
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    MetaData,
    Numeric,
    String,
    Table,
    and_,
    bindparam,
    case,
    column,
    event,
    inspect,
    or_,
    select,
    table,
    text,
    update,
)
from sqlalchemy.orm import Session

from chatter_otel._safety import guarded, warn_once
from chatter_otel._sqlite import connect_wal
from chatter_otel.attributes import (
    LEDGER_DROPPED_METRIC,
    LEDGER_QUARANTINED_METRIC,
    LEDGER_SPOOLED_METRIC,
    LEDGER_WRITTEN_METRIC,
)
from chatter_otel.instrumentation.records import LLMCallRecord, WorkflowRecord
from chatter_otel.instrumentation.runs import current_workflow, last_run
from chatter_otel.sinks.dispatch import RecordSpanProcessor
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider
    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from chatter_otel.instrumentation.records import Record
    from chatter_otel.instrumentation.runs import WorkflowRun

__all__ = ["MessageMapping", "UsagePersistence"]

_log = logging.getLogger("chatter_otel")

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
    Column("response_time_ms", BigInteger),
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
        database_url: str | URL | Engine | AsyncEngine,
        *,
        mapping: MessageMapping | None = None,
        grace_s: float = 30.0,
        bind_window_s: float = 300.0,
        spool_path: str | os.PathLike[str] | None = None,
        batch_size: int = 500,
        batch_delay_s: float = 0.2,
        max_queue: int = 50_000,
        max_spool: int = 1_000_000,
        create_tables: bool = True,
    ) -> None:
        from sqlalchemy.engine import make_url

        # The app's engine gives its URL (password included); ours is a separate engine, on
        # the worker's own event loop, so its SQL is never mistaken for the app's.
        url = make_url(getattr(database_url, "url", database_url))  # type: ignore[arg-type]
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise ValueError(f"chatter-otel: usage persistence supports PostgreSQL and SQLite, "
                             f"not {url.get_backend_name()!r}")  # fmt: skip
        if not getattr(url.get_dialect(), "is_async", False):
            raise ValueError(f"chatter-otel: usage persistence needs an async driver "
                             f"(postgresql+asyncpg://, sqlite+aiosqlite://), "
                             f"not {url.drivername!r}")  # fmt: skip
        self._url = url
        self.mapping = mapping or MessageMapping()
        self.grace_s = grace_s
        self.bind_window_s = bind_window_s
        self.batch_size = batch_size
        self.batch_delay_s = batch_delay_s
        self.max_spool = max_spool
        self.create_tables = create_tables
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        self.spool_path = Path(spool_path or Path(base) / "chatter-otel" / "usage-spool.db")
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=max_queue)
        self.stats = {"written": 0, "spooled": 0, "dropped": 0, "quarantined": 0, "applied": 0,
                      "failures": 0, "in_transaction": 0}  # fmt: skip
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # flush() waits on these: records submitted, records the worker took off the queue, and
        # how many of those were taken when the spool was last seen empty (all in the database).
        self._count_lock = threading.Lock()
        self._submitted = 0
        self._taken = 0
        self._settled = 0
        self._flush_target = 0
        self._settle = threading.Condition()
        self._hurry = threading.Event()  # flush() or close(): write now, do not wait for a batch
        self._installed: list[Any] = []
        self._ready = False  # our tables created
        self._message_columns: frozenset[str] = frozenset()
        self._conversations_ok = False
        self._schema_checked = -1e9  # monotonic time the app's tables were last looked at
        self._first_check = threading.Event()  # the worker has tried the database once
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())

    # -- the app's side -------------------------------------------------------------------------

    def submit(self, kind: str, record: dict[str, Any]) -> None:
        """Queue a record for the worker; never blocks (a full queue drops and counts)."""
        with self._count_lock:
            self._submitted += 1
        try:
            self._queue.put_nowait((kind, record))
        except queue.Full:
            self._mark_taken(1)  # never reaches the worker: flush() must not wait for it
            self.stats["dropped"] += 1
            warn_once("ledger:full", "chatter-otel: usage ledger queue full; %d record(s) dropped",
                      self.stats["dropped"])  # fmt: skip

    def install(self, session_class: Any = Session) -> None:
        """Hook the app's sessions (all of SQLAlchemy's by default; AsyncSession included)."""
        for name, fn in (("before_flush", self._before_flush), ("after_flush", self._after_flush),
                         ("after_commit", self._after_commit),
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
        active = current_workflow.get()
        if active is not None and active.status == "running":
            # A run is in progress here: a message saved now is not the answer of an earlier
            # run (a named message is filled by the worker once this run has ended).
            return
        run = last_run()
        for msg in candidates:
            if run is None or not self._matches(run, msg):
                continue
            # An app that wrote the usage itself (from track_workflow's run) keeps its own
            # totals too: adding the run to the conversation again would count it twice.
            own = not _empty(getattr(msg, m.total_tokens, None))
            self._fill(msg, run)
            u = run.usage
            session.info.setdefault("chatter_bindings", []).append(
                {
                    "workflow_id": run.workflow_id,
                    "message_id": str(getattr(msg, m.message_id)),
                    "conversation_id": getattr(msg, m.conversation_id, None),
                    # exact values, the same the message got (span attributes are floats)
                    "total_tokens": 0 if own else u.total_tokens,
                    "cost": Decimal(0) if own else u.cost,
                }
            )
            session.info.setdefault("chatter_runs", {})[run.workflow_id] = run
            run.bound_message_id = str(getattr(msg, m.message_id))
            break  # one run, one message

    @guarded
    def _after_flush(self, session: Session, flush_context: Any) -> None:
        """The message is in the app's transaction now: write the run's ledger rows, claim the
        run and add it to its conversation in the same transaction, so the accounting commits
        (or rolls back) with the app's message. Where that cannot be done (our tables not
        ready, an old database), the binding goes to the worker after the commit instead."""
        runs = session.info.get("chatter_runs")
        if not runs:
            return
        for binding in session.info.get("chatter_bindings", ()):
            run = runs.pop(binding["workflow_id"], None)
            if run is not None and not binding.get("in_transaction"):
                binding["in_transaction"] = self._write_in_transaction(session, binding, run)

    def _write_in_transaction(self, session: Session, binding: dict[str, Any],
                              run: WorkflowRun) -> bool:  # fmt: skip
        record = run.record
        if not (self._ready and self._conversations_ok) or record is None or not record.outermost:
            return False
        conn = session.connection()
        savepoint = conn.begin_nested()  # a refusal of ours never aborts the app's transaction
        try:
            with suppress_instrumentation():  # the package's own writes are never traced
                if run.calls:
                    rows = [_fit(LEDGER, ledger_row(c)) for c in run.calls]
                    conn.execute(_insert_ignore(conn, LEDGER, "span_id"), rows)
                row = _fit(RUNS, run_row(record, applied_at=time.time()))
                row["message_id"] = binding["message_id"]
                claimed = conn.execute(_claim_upsert(conn), row).rowcount == 1
                conv = binding["conversation_id"]
                tokens, cost = binding["total_tokens"] or 0, binding["cost"] or Decimal(0)
                if claimed and conv is not None and (tokens or cost):
                    conn.execute(self._add_statement(), {"tokens": tokens, "cost": cost,
                                                         "conv": str(conv)})  # fmt: skip
            savepoint.commit()
        except Exception as exc:
            savepoint.rollback()
            warn_once("ledger:in-transaction", "chatter-otel: cannot write the run's usage in the "
                      "app's transaction (%s: %.300s); the ledger's worker writes it after the "
                      "commit", type(exc).__name__, exc)  # fmt: skip
            return False
        self.stats["in_transaction"] += 1
        return True

    def _add_statement(self) -> Any:
        """``UPDATE conversations SET total = total + :delta``: exact under concurrency."""
        m = self.mapping
        return text(
            f'UPDATE "{m.conversations_table}" SET '
            f'"{m.conversation_total_tokens}" = "{m.conversation_total_tokens}" + :tokens, '
            f'"{m.conversation_total_cost}" = "{m.conversation_total_cost}" + :cost '
            f'WHERE "{m.conversation_pk}" = :conv'
        ).bindparams(
            # typed: each dialect converts the Decimal its own way (sqlite3 cannot bind it)
            bindparam("tokens", type_=BigInteger()),
            bindparam("cost", type_=Numeric(20, 10)),
            bindparam("conv", type_=String()),
        )

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
        for name, value in (
            (m.prompt_tokens, u.prompt_tokens), (m.completion_tokens, u.completion_tokens),
            (m.total_tokens, u.total_tokens), (m.cost, u.cost), (m.provider, u.provider),
            (m.model, u.model), (m.finish_reason, u.finish_reason),
            (m.response_time_ms, u.response_time_ms),
        ):  # fmt: skip
            if value is not None and hasattr(msg, name) and _empty(getattr(msg, name)):
                setattr(msg, name, value)

    @guarded
    def _after_commit(self, session: Session) -> None:
        session.info.pop("chatter_runs", None)
        for binding in session.info.pop("chatter_bindings", ()):
            if not binding.pop("in_transaction", False):  # else it committed with the app's
                self.submit("bind", binding)

    @guarded
    def _after_rollback(self, session: Session) -> None:
        session.info.pop("chatter_bindings", None)
        session.info.pop("chatter_runs", None)

    # -- the worker -----------------------------------------------------------------------------

    def start(self, meter_provider: MeterProvider | None = None) -> None:
        """Start the worker thread and register the ledger's metrics (idempotent)."""
        if self._thread is not None:
            return
        self._register_metrics(meter_provider)
        self._stop.clear()
        self._start_thread()
        # At startup, not on a request: wait (bounded) for the worker's first look at the
        # database, so the first messages already get their accounting in the app's own
        # transaction. A database that is down or slow costs at most this wait.
        self._first_check.wait(_STARTUP_WAIT_S)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="chatter-otel-ledger",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _after_fork(self) -> None:
        """In a forked child (servers that load the app, then fork workers): the parent's
        worker thread is not here and its locks may have been held at the fork. New queue,
        locks and thread; the spool file is shared safely (SQLite locking, idempotent replay);
        records queued in the parent stay the parent's."""
        self._queue = queue.Queue(maxsize=self._queue.maxsize)
        self._count_lock = threading.Lock()
        self._settle = threading.Condition()
        self._hurry, self._stop = threading.Event(), threading.Event()
        self._first_check = threading.Event()
        self._submitted = self._taken = self._settled = self._flush_target = 0
        if self._thread is not None:
            self._start_thread()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until everything submitted so far is in the database (or was dropped
        and counted); False on timeout. It sleeps on a condition: no spinning against the worker."""
        with self._count_lock:
            target = self._submitted
        with self._settle:
            self._flush_target = max(self._flush_target, target)
            self._hurry.set()
            return self._settle.wait_for(lambda: self._settled >= target, timeout_s)

    def _mark_taken(self, n: int) -> None:
        with self._count_lock:
            self._taken += n

    def _mark_settled(self) -> None:
        """The spool is empty: every record taken so far is in the database."""
        with self._count_lock:
            taken = self._taken
        with self._settle:
            self._settled = taken
            self._settle.notify_all()
            if taken >= self._flush_target and not self._stop.is_set():
                self._hurry.clear()  # every flush asked so far is done: batch again

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop: what is queued goes to the spool, one last write is tried, the hooks go."""
        self._stop.set()
        self._hurry.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.uninstall()

    def _register_metrics(self, meter_provider: MeterProvider | None) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter("chatter_otel", __version__, meter_provider,
                                  schema_url=SCHEMA_URL)  # fmt: skip
        stats = self.stats

        def observe(key: str) -> Callable[[Any], list[Observation]]:
            return lambda _options: [Observation(stats[key])]

        meter.create_observable_counter(LEDGER_WRITTEN_METRIC, [observe("written")],
                                        unit="{record}")  # fmt: skip
        meter.create_observable_counter(LEDGER_DROPPED_METRIC, [observe("dropped")],
                                        unit="{record}")  # fmt: skip
        meter.create_observable_counter(LEDGER_QUARANTINED_METRIC, [observe("quarantined")],
                                        unit="{record}")  # fmt: skip
        meter.create_observable_gauge(LEDGER_SPOOLED_METRIC, [observe("spooled")],
                                      unit="{record}")  # fmt: skip

    def _thread_main(self) -> None:
        with suppress_instrumentation():  # our own SQL is never traced as app work
            try:
                asyncio.run(self._main())
            except Exception:  # a bug of ours: say so loudly rather than dying silently
                _log.exception("chatter-otel: usage ledger worker stopped; %d record(s) queued "
                               "in memory are not written", self._queue.qsize())  # fmt: skip

    async def _open_spool(self) -> _Spool | None:
        """The spool, retried with backoff while it cannot be opened (locked by another process,
        unwritable directory); records wait in the bounded queue meanwhile. None when asked to
        stop first."""
        backoff = 0.5
        while True:
            try:
                return _Spool(self.spool_path)
            except (sqlite3.Error, OSError) as exc:
                if isinstance(exc, sqlite3.DatabaseError) and _set_aside(self.spool_path, exc):
                    continue  # a fresh file at the same path, at once
                if self._stop.is_set():
                    _log.error("chatter-otel: usage spool at %s cannot be opened (%s); %d "
                               "queued record(s) are not written", self.spool_path, exc,
                               self._queue.qsize())  # fmt: skip
                    return None
                warn_once("ledger:spool-open", "chatter-otel: usage spool at %s cannot be "
                          "opened (%s: %s); retrying", self.spool_path, type(exc).__name__,
                          exc)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _engine(self) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        # A database that does not answer (dropped packets) must not hold the worker for
        # asyncpg's 60 s default: records keep moving from the queue to the spool meanwhile.
        # No statement timeout: waiting for the app's row lock is fine off the request path.
        connect_args = {"timeout": 10} if self._url.get_backend_name() == "postgresql" else {}
        return create_async_engine(self._url, pool_pre_ping=True, connect_args=connect_args)

    def _spool_held(self, spool: _Spool, held: list[tuple[str, dict[str, Any]]]) -> bool:
        """Move ``held`` into the spool (FIFO: new work waits behind it), as far as ``max_spool``
        leaves room (the rest is dropped and counted). False, records kept, when the spool
        cannot be written (disk full, file locked too long)."""
        room = max(self.max_spool - spool.count, 0)
        try:
            spool.add(held[:room])
        except sqlite3.Error as exc:
            why = "the disk is full" if "full" in str(exc).lower() else str(exc)
            warn_once("ledger:spool-write", "chatter-otel: usage spool at %s cannot be written "
                      "(%s); %d record(s) held in memory, retrying", self.spool_path, why,
                      len(held))  # fmt: skip
            return False
        self.stats["spooled"] = spool.count
        if room < len(held):
            self.stats["dropped"] += len(held) - room
            warn_once("ledger:spool", "chatter-otel: usage spool at %s is full (%d records); "
                      "%d record(s) dropped so far", self.spool_path, self.max_spool,
                      self.stats["dropped"])  # fmt: skip
        self._mark_taken(len(held))
        held.clear()
        return True

    async def _main(self) -> None:
        engine = self._engine()
        spool = await self._open_spool()
        if spool is None:
            await engine.dispose()
            return
        self.stats["spooled"] = spool.count
        if spool.count:
            _log.info("chatter-otel: %d usage record(s) in the spool at %s from an earlier run; "
                      "replaying", spool.count, self.spool_path)  # fmt: skip
        backoff, next_try, next_sweep, failing = 0.5, 0.0, 0.0, False
        held: list[tuple[str, dict[str, Any]]] = []  # taken, not yet in the spool
        pending_since: float | None = None  # when the spool last got records not yet written
        try:
            while True:
                stopping = self._stop.is_set()
                if len(held) < self.batch_size:  # bounded: the queue fills (and counts) instead
                    held += self._take(0.0 if stopping else 0.05)  # blocks only this loop
                # Into the spool at once, with no batching window: a record is durable a few
                # milliseconds after its span ended (docs/decisions.md, "Exactly once").
                if held and not self._spool_held(spool, held):
                    if stopping:
                        break
                    await asyncio.sleep(0.5)
                    continue
                now = time.monotonic()
                if spool.count and pending_since is None:
                    pending_since = now
                if now < next_try:
                    if stopping:
                        break
                    continue
                if not (stopping or self._db_due(now, pending_since, next_sweep, spool.count)):
                    continue
                try:
                    try:
                        await self._ensure_tables(engine)
                    finally:
                        self._first_check.set()
                    written = await self._drain(engine, spool)
                    if not stopping and time.monotonic() >= next_sweep:
                        await self._apply_due_runs(engine)
                        next_sweep = time.monotonic() + min(1.0, self.grace_s)
                    if failing:
                        _log.warning("chatter-otel: usage ledger reached the database again; "
                                     "%d spooled record(s) written", written)  # fmt: skip
                    backoff, failing = 0.5, False
                    pending_since = None
                    if not spool.count:
                        self._mark_settled()
                except Exception as exc:  # the database is down or refused the batch
                    self.stats["failures"] += 1
                    failing = True
                    warn_once("ledger:db", "chatter-otel: usage ledger cannot write to the "
                              "database (%s: %.300s); %d record(s) spooled at %s, retrying",
                              type(exc).__name__, exc, spool.count, self.spool_path)  # fmt: skip
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, 30.0)
                if stopping:
                    break
        finally:
            await self._stopped(held, spool, engine)

    async def _stopped(self, held: list[tuple[str, dict[str, Any]]], spool: _Spool,
                       engine: Any) -> None:  # fmt: skip
        """Say what a stopping worker leaves behind, then close the spool and the engine."""
        if held:
            _log.error("chatter-otel: usage ledger stopped with %d record(s) it could not "
                       "spool; they are not written", len(held))  # fmt: skip
        if spool.count:
            _log.warning("chatter-otel: usage ledger stopped with %d record(s) in the spool at "
                         "%s; they are written when it next starts", spool.count,
                         self.spool_path)  # fmt: skip
        spool.close()
        await engine.dispose()

    def _db_due(self, now: float, pending_since: float | None, next_sweep: float,
                spooled: int) -> bool:  # fmt: skip
        """The database in batches: one transaction per ``batch_delay_s`` (or a full batch, a
        flush, the sweep), not per record: each write takes interpreter time from the app."""
        return (
            self._hurry.is_set() or now >= next_sweep or spooled >= self.batch_size
            or (pending_since is not None and now - pending_since >= self.batch_delay_s)
        )  # fmt: skip

    def _take(self, timeout_s: float) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``batch_size`` records: the first waited for up to ``timeout_s``, then what
        else is queued already (no waiting for more: they go to the spool now)."""
        batch: list[tuple[str, dict[str, Any]]] = []
        try:
            batch.append(
                self._queue.get(timeout=timeout_s) if timeout_s else self._queue.get_nowait()
            )
            while len(batch) < self.batch_size:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    async def _ensure_tables(self, engine: Any) -> None:
        if not self._ready:
            if self.create_tables:
                async with engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
            self._ready = True
        if not self._conversations_ok:  # known before the app's first message, when it can be
            async with engine.connect() as conn:
                await self._know_app_schema(conn)

    async def _know_app_schema(self, conn: Any, *, now: bool = False) -> None:
        """Look at the app's tables; again (at most once a second, or ``now``) while one is
        missing, since the app may create them after the ledger started."""
        if self._message_columns and self._conversations_ok:
            return
        if not now and time.monotonic() - self._schema_checked < _SCHEMA_RECHECK_S:
            return
        self._schema_checked = time.monotonic()
        self._message_columns, self._conversations_ok = await conn.run_sync(self._app_schema)

    def _app_schema(self, conn: Any) -> tuple[frozenset[str], bool]:
        """The columns the app's messages table really has (follow-up updates touch no other),
        and whether its conversations table has the mapped columns."""
        m, insp = self.mapping, inspect(conn)
        messages: frozenset[str] = frozenset()
        if insp.has_table(m.messages_table):
            messages = frozenset(c["name"] for c in insp.get_columns(m.messages_table))
        conversations: frozenset[str] = frozenset()
        if insp.has_table(m.conversations_table):
            conversations = frozenset(c["name"] for c in insp.get_columns(m.conversations_table))
        return messages, self._conversation_columns() <= conversations

    def _conversation_columns(self) -> set[str]:
        m = self.mapping
        return {m.conversation_pk, m.conversation_total_tokens, m.conversation_total_cost}

    async def _drain(self, engine: Any, spool: _Spool) -> int:
        """Write the spool to the database in batches, oldest first; returns rows written."""
        written = 0
        while True:
            rows = spool.peek(self.batch_size)
            if spool.bad:
                self.stats["quarantined"] += spool.bad
                spool.bad = 0
            if not rows:
                self.stats["spooled"] = spool.count
                if not spool.count and written:
                    spool.checkpoint()
                return written
            try:
                async with engine.begin() as conn:
                    await self._apply_rows(conn, rows)
            except Exception:
                # One record may be what the database refuses: find it, keep the rest flowing.
                written += await self._isolate(engine, spool, rows)
                continue
            spool.delete(rows[-1][0])
            written += self._count_written(spool, len(rows))

    def _count_written(self, spool: _Spool, n: int) -> int:
        self.stats["written"] += n
        self.stats["spooled"] = spool.count
        return n

    async def _isolate(self, engine: Any, spool: _Spool, rows: list[_SpoolRow]) -> int:
        """Retry a refused batch one record at a time. A record the database refuses while it
        answers is quarantined (kept in the spool file, logged); an outage raises."""
        written = 0
        for row in rows:
            refused = await self._apply_alone(engine, row)
            if refused is None:
                spool.delete(row[0])
                written += self._count_written(spool, 1)
                continue
            spool.quarantine(row[0], f"{type(refused).__name__}: {refused}")
            self.stats["quarantined"] += 1
            _log.error("chatter-otel: the usage database refused a %s record (%s: %.300s); "
                       "kept aside in table 'quarantine' of %s", row[1], type(refused).__name__,
                       refused, self.spool_path)  # fmt: skip
        return written

    async def _apply_alone(self, engine: Any, row: _SpoolRow) -> Exception | None:
        """One record in its own transaction, tried twice (a deadlock or a serialization
        failure passes). Returns what the database said if it refused the record; raises if
        the database does not answer ``SELECT 1`` (an outage, not a bad record)."""
        refused: Exception | None = None
        for _attempt in range(2):
            try:
                async with engine.begin() as conn:
                    await self._apply_rows(conn, [row])
                return None
            except Exception as exc:
                refused = exc
            async with engine.connect() as conn:
                await conn.execute(select(1))
        return refused

    async def _apply_rows(self, conn: Any, rows: list[_SpoolRow]) -> None:
        """All ledger rows in one executemany, all run rows in another, then the claims (the
        order in which they were made) and their conversation totals, in one transaction."""
        llm = [_fit(LEDGER, r) for _, kind, r in rows if kind == "llm"]
        runs = [_fit(RUNS, r) for _, kind, r in rows if kind == "run"]
        binds = [r for _, kind, r in rows if kind == "bind"]
        if llm:
            await conn.execute(_insert_ignore(conn, LEDGER, "span_id"), llm)
        if runs:
            await conn.execute(_insert_ignore(conn, RUNS, "workflow_id"), runs)
        if binds:
            await self._claim_all(conn, [(b["workflow_id"], b) for b in binds])

    async def _claim_all(self, conn: Any, claims: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Claim runs (one ``SELECT`` for all, an ``UPDATE`` each), then add to conversations."""
        ids = list({workflow_id for workflow_id, _ in claims})
        found = await conn.execute(select(RUNS).where(RUNS.c.workflow_id.in_(ids)))
        pending = {r.workflow_id: r for r in found if r.applied_at is None}
        deltas = _Deltas()
        for workflow_id, bind in claims:
            row = pending.pop(workflow_id, None)
            if row is not None:
                await self._claim(conn, row, bind, deltas)
        await self._add_to_conversations(conn, deltas)

    async def _claim(
        self, conn: Any, row: Any, bind: dict[str, Any] | None, deltas: _Deltas
    ) -> None:
        """Claim a run, once: whoever claims it first (``applied_at IS NULL`` -> now) adds its
        tokens and cost to ``deltas`` (applied to conversations at the end of the transaction).

        ``bind`` is the binding the app's transaction made (its message is filled already);
        without one, a message the run named is filled here, where the app left it empty.
        """
        workflow_id = row.workflow_id
        await self._know_app_schema(conn)
        bind = bind or {}
        message_id = bind.get("message_id") or row.message_id
        claimed = await conn.execute(
            update(RUNS)
            .where(and_(RUNS.c.workflow_id == workflow_id, RUNS.c.applied_at.is_(None)))
            .values(applied_at=time.time(), message_id=message_id)
        )
        if claimed.rowcount != 1:
            return
        if not bind and row.message_id:
            await self._fill_named_message(conn, row)
        tokens = bind.get("total_tokens", row.total_tokens)
        cost = bind.get("cost", row.cost)
        conv = bind.get("conversation_id") or row.conversation_id
        deltas.claimed += 1
        if conv is not None and (tokens or cost):
            total = deltas.setdefault(str(conv), [0, Decimal(0)])
            total[0] += tokens or 0
            total[1] += cost or Decimal(0)

    async def _add_to_conversations(self, conn: Any, deltas: _Deltas) -> None:
        """One ``UPDATE`` per conversation, last in the transaction (the app's own updates of
        the row wait for its lock the shortest time) and in id order (two workers, two
        processes, never deadlock on each other)."""
        self.stats["applied"] += deltas.claimed
        if not deltas:
            return
        if not self._conversations_ok:  # the app may have created it since the last look
            await self._know_app_schema(conn, now=True)
        if not self._conversations_ok:  # logged, not raised: a refused batch would block the rest
            warn_once("ledger:conversations", "chatter-otel: table %r with columns %s is not in "
                      "the usage database (%s); conversation totals are not updated until it is "
                      "(see MessageMapping). Usage is still recorded per run in %s",
                      self.mapping.conversations_table, sorted(self._conversation_columns()),
                      self._url.render_as_string(hide_password=True), RUNS.name)  # fmt: skip
            return
        statement = self._add_statement()
        for conv in sorted(deltas):
            tokens, cost = deltas[conv]
            await conn.execute(statement, {"tokens": tokens, "cost": cost, "conv": conv})

    async def _fill_named_message(self, conn: Any, run: Any) -> None:
        """Fill the message a run named, where the app left it empty or zero (it may have
        saved it before the run ended, or not yet: then the binding fills it on insert)."""
        m, have = self.mapping, self._message_columns
        last = (
            await conn.execute(
                select(LEDGER.c.provider, LEDGER.c.model, LEDGER.c.finish_reason)
                .where(LEDGER.c.workflow_id == run.workflow_id)
                .order_by(LEDGER.c.started_at.desc())
                .limit(1)
            )
        ).first()
        values = {
            m.prompt_tokens: run.input_tokens, m.completion_tokens: run.output_tokens,
            m.total_tokens: run.total_tokens, m.cost: run.cost,
            m.response_time_ms: run.response_time_ms,
            m.provider: last and last.provider, m.model: last and last.model,
            m.finish_reason: last and last.finish_reason,
        }  # fmt: skip
        values = {k: v for k, v in values.items() if k in have and v is not None}
        if not values or m.message_id not in have:
            return
        messages = table(m.messages_table, *(column(k) for k in (*values, m.message_id)))
        await conn.execute(
            update(messages)
            .where(messages.c[m.message_id] == run.message_id)
            .values({k: _if_empty(messages.c[k], v) for k, v in values.items()})
        )

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
            if due:
                await self._claim_all(conn, [(workflow_id, None) for workflow_id in due])


def _if_empty(col: Any, value: Any) -> Any:
    """``value`` where the column is NULL, zero or empty (the app's placeholders), else as is."""
    placeholder = "" if isinstance(value, str) else 0
    return case((or_(col.is_(None), col == placeholder), value), else_=col)


def _insert_ignore(conn: Any, table: Table, key: str) -> Any:
    """An insert that skips rows already there (a replay): ``ON CONFLICT DO NOTHING``."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # sqlite: the only other backend __init__ accepts
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(table).on_conflict_do_nothing(index_elements=[key])


def _claim_upsert(conn: Any) -> Any:
    """Insert the run row claimed, or claim the row the worker inserted first; rowcount 1 only
    for whoever claims it (``applied_at IS NULL`` -> now), so a run is added once."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(RUNS)
    return stmt.on_conflict_do_update(
        index_elements=[RUNS.c.workflow_id],
        set_={"applied_at": stmt.excluded.applied_at, "message_id": stmt.excluded.message_id},
        where=RUNS.c.applied_at.is_(None),
    )


def _fit(table: Table, record: dict[str, Any]) -> dict[str, Any]:
    """Every column of ``table`` (one executemany needs the same keys), strings cut to the
    column's length: an over-long id from a hostile header must not make PostgreSQL refuse it."""
    out: dict[str, Any] = {}
    for col in table.c:
        value = record.get(col.name)
        length = getattr(col.type, "length", None)
        if length and isinstance(value, str) and len(value) > length:
            value = value[:length]
        out[col.name] = value
    return out


_SpoolRow = tuple[int, str, dict[str, Any]]


class _Deltas(dict[str, list[Any]]):
    """Conversation id -> [tokens, cost] to add, in one transaction; ``claimed`` runs in it."""

    claimed = 0


_SCHEMA_RECHECK_S = 1.0
_STARTUP_WAIT_S = 2.0
# How long a spool statement waits for a lock: another process sharing the file (two workers
# left on the default path) holds its write lock only for one batch.
_SPOOL_BUSY_S = 30.0
_SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    payload TEXT NOT NULL, error TEXT NOT NULL, at REAL NOT NULL);
"""


class _Spool:
    """A local SQLite file of pending records, in order; survives a restart. Records the
    database refused wait in its ``quarantine`` table, with the error, for a person to look at.

    ``count`` is kept in memory (a ``COUNT(*)`` per loop would cost more than the writes).
    """

    def __init__(self, path: Path) -> None:
        self.bad = 0  # undecodable rows quarantined so far
        self._db = connect_wal(path, timeout_s=_SPOOL_BUSY_S, schema=_SPOOL_SCHEMA)
        self.count = int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def add(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        if not batch:
            return
        with self._db:
            self._db.executemany(
                "INSERT INTO spool (kind, payload) VALUES (?, ?)",
                [(kind, json.dumps(r, default=str)) for kind, r in batch],
            )
        self.count += len(batch)

    def peek(self, n: int) -> list[_SpoolRow]:
        """The oldest ``n`` rows, decoded. A row that does not decode (a corrupt payload) is
        quarantined here, counted in ``bad`` and logged: it never holds up the rows behind it."""
        rows = self._db.execute(
            "SELECT id, kind, payload FROM spool ORDER BY id LIMIT ?", (n,)
        ).fetchall()
        if not rows:  # another process sharing the file may have written (and removed) ours
            self.count = 0
        out: list[_SpoolRow] = []
        for i, kind, payload in rows:
            try:
                record = _decode(json.loads(payload))
                if kind not in ("llm", "run", "bind") or not isinstance(record, dict):
                    raise ValueError(f"not a usage record: kind {kind!r}")
            except (ValueError, TypeError, ArithmeticError) as exc:
                self.quarantine(i, f"undecodable: {type(exc).__name__}: {exc}")
                self.bad += 1
                _log.error("chatter-otel: an undecodable usage record in the spool (%s); kept "
                           "aside in table 'quarantine'", exc)  # fmt: skip
                continue
            out.append((i, kind, record))
        return out

    def checkpoint(self) -> None:
        """Fold the WAL back into the file and truncate it: the spool's WAL stays small."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def delete(self, upto: int) -> None:
        with self._db:
            gone = self._db.execute("DELETE FROM spool WHERE id <= ?", (upto,)).rowcount
        self.count = max(self.count - gone, 0)

    def quarantine(self, row_id: int, error: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO quarantine (id, kind, payload, error, at)"
                " SELECT id, kind, payload, ?, ? FROM spool WHERE id = ?",
                (error[:2000], time.time(), row_id),
            )  # fmt: skip
            gone = self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,)).rowcount
        self.count = max(self.count - gone, 0)

    def close(self) -> None:
        self._db.close()


def _set_aside(path: Path, exc: sqlite3.DatabaseError) -> bool:
    """Move an unusable spool file (corrupt, not a database, read-only) out of the way so a
    fresh one can take its place; the old one is kept for a person to look at. False when the
    error is only a lock (another process), or the file cannot be moved."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return False
    aside = path.with_name(f"{path.name}.unusable-{int(time.time())}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                src.rename(aside.with_name(aside.name + suffix))
    except OSError as move_exc:
        warn_once("ledger:spool-aside", "chatter-otel: usage spool at %s is unusable (%s) and "
                  "cannot be moved aside (%s); retrying", path, exc, move_exc)  # fmt: skip
        return False
    _log.error("chatter-otel: usage spool at %s was unusable (%s: %s); moved to %s, a fresh "
               "spool is used", path, type(exc).__name__, exc, aside)  # fmt: skip
    return True


def _decode(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TypeError(f"a {type(record).__name__}, not an object")
    if record.get("cost") is not None:
        record["cost"] = Decimal(str(record["cost"]))
    return record


class LedgerSpanProcessor(RecordSpanProcessor):
    """LLM call records -> ledger rows; outermost workflow records -> run rows."""

    def __init__(self, persistence: UsagePersistence | None) -> None:
        self.persistence = persistence

    def repoint(self, persistence: UsagePersistence | None = None, **_: Any) -> None:
        self.persistence = persistence

    def detach(self) -> None:
        self.persistence = None

    def ended(self, rec: Record) -> None:
        persistence = self.persistence
        if persistence is None:
            return
        if isinstance(rec, LLMCallRecord):
            persistence.submit("llm", ledger_row(rec))
        elif isinstance(rec, WorkflowRecord) and rec.outermost:
            persistence.submit("run", run_row(rec))


def ledger_row(rec: LLMCallRecord) -> dict[str, Any]:
    ids = rec.ids
    return {
        "span_id": rec.span_id, "trace_id": rec.trace_id, "workflow_id": rec.workflow_id,
        "conversation_id": ids.conversation_id, "message_id": ids.message_id,
        "correlation_id": ids.correlation_id, "user_id": ids.user_id,
        "provider": rec.provider, "model": rec.model,
        "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
        "total_tokens": rec.total_tokens, "cache_read_tokens": rec.cache_read_tokens,
        "cache_creation_tokens": rec.cache_creation_tokens,
        "reasoning_tokens": rec.reasoning_tokens, "cost": rec.cost,
        "currency": rec.cost_currency, "cost_source": rec.cost_source,
        "finish_reason": rec.finish_reasons[0] if rec.finish_reasons else None,
        "started_at": rec.start_ns / 1e9, "duration_ms": (rec.end_ns - rec.start_ns) / 1e6,
        "status": "error" if rec.failed else "ok",
    }  # fmt: skip


def run_row(rec: WorkflowRecord, applied_at: float | None = None) -> dict[str, Any]:
    return {
        "workflow_id": rec.span_id, "trace_id": rec.trace_id,
        "conversation_id": rec.ids.conversation_id, "message_id": rec.ids.message_id,
        "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
        "total_tokens": rec.total_tokens, "cost": rec.cost,
        "status": "error" if rec.failed else "ok",
        "response_time_ms": (rec.end_ns - rec.start_ns) // 1_000_000,
        "finished_at": rec.end_ns / 1e9, "applied_at": applied_at,
    }  # fmt: skip
