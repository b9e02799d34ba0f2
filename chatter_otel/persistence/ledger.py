"""``UsagePersistence``: the ledger's public object, its queue and its worker thread."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Observation

from chatter_otel._safety import warn_once
from chatter_otel.attributes import (
    LEDGER_DROPPED_METRIC,
    LEDGER_QUARANTINED_METRIC,
    LEDGER_SPOOLED_METRIC,
    LEDGER_WRITTEN_METRIC,
)
from chatter_otel.persistence.binding import BindingHooks
from chatter_otel.persistence.schema import MessageMapping
from chatter_otel.persistence.spool import Spool, SpoolCount, set_aside
from chatter_otel.persistence.writer import LedgerWriter
from chatter_otel.sinks.worker import BoundedWorker
from chatter_otel.version import SCHEMA_URL, __version__

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider
    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine


_log = logging.getLogger("chatter_otel")

__all__ = ["UsagePersistence"]

_STARTUP_WAIT_S = 2.0


@dataclass
class _LoopState:
    """The worker loop's retry and batching clock."""

    backoff: float = 0.5
    next_try: float = 0.0  # monotonic: no database round before (backing off)
    next_sweep: float = 0.0  # monotonic: the next sweep of runs no message took
    failing: bool = False
    pending_since: float | None = None  # when the spool last got records not yet written


class UsagePersistence(BindingHooks, LedgerWriter):
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
        self.stats = {"written": 0, "spooled": 0, "dropped": 0, "quarantined": 0, "applied": 0,
                      "failures": 0, "in_transaction": 0}  # fmt: skip
        # Stage 1, the intake: the one bounded worker design (drop counter, re-made after a
        # fork) moves records from memory to the spool file at once, in whatever batch is queued.
        self._intake: BoundedWorker[tuple[str, dict[str, Any]]] = BoundedWorker(
            "ledger-intake", self._to_spool, max_queue=max_queue, max_batch=batch_size,
            start=False,
        )  # fmt: skip
        self._counter = SpoolCount()
        self._intake_spool: Spool | None = None  # the intake thread's connection
        # Stage 2, the database worker: its own thread, event loop and engine.
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the intake spooled something, or a flush is asked
        self._hurry = threading.Event()  # flush() or close(): write now, do not wait for a batch
        self._settle = threading.Condition()
        self._settled = 0  # SpoolCount.handled as of the last time the spool was seen empty
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
        """Queue a record for the spool; never blocks (a full queue drops and counts)."""
        if not self._intake.submit((kind, record)):
            self.stats["dropped"] += 1
            warn_once("ledger:full", "chatter-otel: usage ledger queue full; %d record(s) dropped",
                      self.stats["dropped"])  # fmt: skip

    def start(self, meter_provider: MeterProvider | None = None) -> None:
        """Start the workers and register the ledger's metrics (idempotent)."""
        if self._thread is not None:
            return
        self._register_metrics(meter_provider)
        self._stop.clear()
        self._intake.start()
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
        threads are not here, its locks may have been held at the fork and its SQLite
        connections must not be used. New locks, connections and database thread (the intake
        re-makes itself); the spool file is shared safely (SQLite locking, idempotent replay)."""
        self._counter = SpoolCount()
        self._intake_spool = None
        self._settle = threading.Condition()
        self._wake, self._hurry = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._first_check = threading.Event()
        self._settled = 0
        if self._thread is not None:
            self._start_thread()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until everything submitted so far is in the database (or was dropped
        and counted); False on timeout. It sleeps on conditions: no spinning against workers."""
        deadline = time.monotonic() + timeout_s
        if not self._intake.flush(timeout_s):  # all submitted so far handled by the intake
            return False
        with self._counter.lock:
            target = self._counter.handled
        with self._settle:
            self._hurry.set()
            self._wake.set()
            done: bool = self._settle.wait_for(
                lambda: self._settled >= target, max(deadline - time.monotonic(), 0.0)
            )
            return done

    def _mark_settled(self, handled: int) -> None:
        with self._settle:
            self._settled = max(self._settled, handled)
            self._settle.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop: what is queued goes to the spool, one last write is tried, the hooks go."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._intake.stop(timeout_s)  # its queue into the spool first (bounded)
        self._hurry.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.1))
            self._thread = None
        if self._intake_spool is not None and not self._intake.pending():
            self._intake_spool.close()
            self._intake_spool = None
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

    # -- stage 1: the intake thread, memory -> spool ---------------------------------------------

    def _to_spool(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Append ``batch`` to the spool, as far as ``max_spool`` leaves room (the rest is
        dropped and counted). While the file cannot be opened or written (locked by another
        process, a full disk) the batch is held and retried with backoff; meanwhile the bounded
        queue fills and drops, counted. Given up only when stopping, with a log line."""
        backoff = 0.5
        while True:
            try:
                spool = self._intake_spool or self._open_spool()
                self._intake_spool = spool
                room = max(self.max_spool - spool.count, 0)
                spool.add(batch[:room], dropped=max(len(batch) - room, 0))
            except (sqlite3.Error, OSError) as exc:
                if self._intake_spool is not None:
                    why = "the disk is full" if "full" in str(exc).lower() else str(exc)
                    warn_once("ledger:spool-write", "chatter-otel: usage spool at %s cannot be "
                              "written (%s); %d record(s) held in memory, retrying",
                              self.spool_path, why, len(batch))  # fmt: skip
                if self._stop.is_set():
                    _log.error("chatter-otel: usage ledger stopped with %d record(s) it could "
                               "not spool; they are not written", len(batch))  # fmt: skip
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            break
        self.stats["spooled"] = spool.count
        if room < len(batch):
            self.stats["dropped"] += len(batch) - room
            warn_once("ledger:spool", "chatter-otel: usage spool at %s is full (%d records); "
                      "%d record(s) dropped so far", self.spool_path, self.max_spool,
                      self.stats["dropped"])  # fmt: skip
        self._wake.set()

    def _open_spool(self) -> Spool:
        """A connection to the spool; a file that is unusable (corrupt, not a database,
        read-only) is set aside and a fresh one opened at once. Raises while it cannot be
        opened (locked by another process, an unwritable folder), saying so once a minute."""
        try:
            return Spool(self.spool_path, self._counter)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and set_aside(self.spool_path, exc):
                return Spool(self.spool_path, self._counter)
            warn_once("ledger:spool-open", "chatter-otel: usage spool at %s cannot be opened "
                      "(%s: %s); retrying", self.spool_path, type(exc).__name__,
                      exc)  # fmt: skip
            raise

    # -- stage 2: the database thread, spool -> database ------------------------------------------

    def _thread_main(self) -> None:
        with suppress_instrumentation():  # our own SQL is never traced as app work
            try:
                asyncio.run(self._main())
            except Exception:  # a bug of ours: say so loudly rather than dying silently
                _log.exception("chatter-otel: usage ledger worker stopped; spooled records are "
                               "written when it next starts")  # fmt: skip

    def _engine(self) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        # A database that does not answer (dropped packets) must not hold the worker for
        # asyncpg's 60 s default. No statement timeout: waiting for the app's row lock is fine
        # off the request path.
        connect_args = {"timeout": 10} if self._url.get_backend_name() == "postgresql" else {}
        return create_async_engine(self._url, pool_pre_ping=True, connect_args=connect_args)

    async def _reader(self) -> Spool | None:
        """This thread's connection to the spool, retried with backoff; None when stopping."""
        backoff = 0.5
        while True:
            try:
                return self._open_spool()
            except (sqlite3.Error, OSError):
                if self._stop.is_set():
                    return None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _main(self) -> None:
        engine = self._engine()
        spool = await self._reader()
        if spool is None:
            self._first_check.set()
            await engine.dispose()
            return
        self.stats["spooled"] = spool.count
        if spool.count:
            _log.info("chatter-otel: %d usage record(s) in the spool at %s from an earlier run; "
                      "replaying", spool.count, self.spool_path)  # fmt: skip
        state = _LoopState()
        try:
            while True:
                stopping = self._stop.is_set() and not self._intake.pending()
                if not stopping:  # woken by the intake or a flush; sweeps are time-driven
                    # Blocking is fine: this event loop is the worker's own, with nothing else.
                    self._wake.wait(0.05)
                self._wake.clear()
                now = time.monotonic()
                if spool.count and state.pending_since is None:
                    state.pending_since = now
                if now >= state.next_try and (stopping or self._db_due(now, state, spool.count)):
                    await self._db_round(engine, spool, state, stopping)
                if stopping:
                    break
        finally:
            await self._stopped(spool, engine)

    async def _db_round(self, engine: Any, spool: Spool, state: _LoopState, stopping: bool) -> None:
        """Write what the spool holds, sweep the runs no message took; back off on failure."""
        try:
            try:
                await self._ensure_tables(engine)
            finally:
                self._first_check.set()
            written = await self._drain(engine, spool)
            if not stopping and time.monotonic() >= state.next_sweep:
                await self._apply_due_runs(engine)
                state.next_sweep = time.monotonic() + min(1.0, self.grace_s)
            if state.failing:
                _log.warning("chatter-otel: usage ledger reached the database again; "
                             "%d spooled record(s) written", written)  # fmt: skip
            state.backoff, state.failing, state.pending_since = 0.5, False, None
            handled = spool.settled_upto()
            if handled is not None:
                self.stats["spooled"] = 0
                if not self._intake.pending():
                    self._hurry.clear()  # every flush asked so far is done: batch again
                self._mark_settled(handled)
        except Exception as exc:  # the database is down or refused the batch
            self.stats["failures"] += 1
            state.failing = True
            warn_once("ledger:db", "chatter-otel: usage ledger cannot write to the database "
                      "(%s: %.300s); %d record(s) spooled at %s, retrying", type(exc).__name__,
                      exc, spool.count, self.spool_path)  # fmt: skip
            state.next_try = time.monotonic() + state.backoff
            state.backoff = min(state.backoff * 2, 30.0)

    async def _stopped(self, spool: Spool, engine: Any) -> None:
        """Say what a stopping worker leaves behind, then close the spool and the engine."""
        if spool.count:
            _log.warning("chatter-otel: usage ledger stopped with %d record(s) in the spool at "
                         "%s; they are written when it next starts", spool.count,
                         self.spool_path)  # fmt: skip
        spool.close()
        await engine.dispose()

    def _db_due(self, now: float, state: _LoopState, spooled: int) -> bool:
        """The database in batches: one transaction per ``batch_delay_s`` (or a full batch, a
        flush, the sweep), not per record: each write takes interpreter time from the app."""
        return (
            self._hurry.is_set() or now >= state.next_sweep or spooled >= self.batch_size
            or (state.pending_since is not None
                and now - state.pending_since >= self.batch_delay_s)
        )  # fmt: skip
