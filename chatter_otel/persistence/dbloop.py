"""Stage 2 of the ledger: the database thread, spool (and held records) -> database.

It runs on its own thread and event loop. Each round writes the spool's records oldest first,
then the records the intake could not spool (held in memory), then sweeps the runs no message
took. A spool that cannot be read is closed and tried again later while the held records keep
flowing; a database that is down backs the round off. Nothing here waits on the spool to reach
the database, and nothing waits on the database to keep the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.utils import suppress_instrumentation

from chatter_otel._safety import warn_once
from chatter_otel.persistence.spool import SpoolUnusable

if TYPE_CHECKING:
    import threading
    from collections import deque
    from pathlib import Path

    from chatter_otel.persistence.spool import Spool, SpoolCount, SpoolRow
    from chatter_otel.sinks.worker import BoundedWorker

_log = logging.getLogger("chatter_otel")

_REOPEN_S = 1.0  # a spool this thread cannot read is tried again this often


@dataclass
class _LoopState:
    """The worker loop's retry and batching clock."""

    backoff: float = 0.5
    next_try: float = 0.0  # monotonic: no database round before (backing off)
    next_sweep: float = 0.0  # monotonic: the next sweep of runs no message took
    last_sweep: float = -1e9  # monotonic
    next_open: float = 0.0  # monotonic: the next try to open the spool, while it is closed
    failing: bool = False
    pending_since: float | None = None  # when records last arrived that are not yet written


class DatabaseLoop:
    """Mixed into ``UsagePersistence``: its database thread."""

    stats: dict[str, int]
    spool_path: Path
    batch_size: int
    batch_delay_s: float
    grace_s: float
    _url: Any
    _counter: SpoolCount
    _held: deque[tuple[str, dict[str, Any]]]
    _intake: BoundedWorker[tuple[str, dict[str, Any]]]
    _stop: threading.Event
    _wake: threading.Event
    _hurry: threading.Event
    _first_check: threading.Event
    _retired: list[Spool]  # set-aside files this thread still reads from
    _sweep_due: float  # wall time (LedgerWriter)

    if TYPE_CHECKING:

        def _open_spool(self) -> Spool: ...
        def _mark_settled(self, handled: int) -> None: ...
        def _count_dropped(self, n: int, why: str) -> None: ...
        async def _ensure_tables(self, engine: Any) -> None: ...
        async def _drain(self, engine: Any, spool: Spool) -> int: ...
        async def _apply_rows(self, conn: Any, rows: list[SpoolRow]) -> None: ...
        async def _apply_alone(self, engine: Any, row: SpoolRow) -> Exception | None: ...
        async def _apply_due_runs(self, engine: Any) -> None: ...

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

    def _reader(self, spool: Spool | None, state: _LoopState) -> Spool | None:
        """This thread's connection to the spool: the one it has, a new one when the intake
        replaced an unusable file (after writing what the old one still gives), or, while it
        cannot be opened, None (tried again every ``_REOPEN_S``)."""
        if spool is not None and spool.generation == self._counter.generation:
            return spool
        now = time.monotonic()
        if spool is None and now < state.next_open:
            return None
        state.next_open = now + _REOPEN_S
        try:
            fresh = self._open_spool()
        except (sqlite3.Error, OSError):
            return spool
        if spool is not None:  # set aside by the intake: its records still go first
            self._retired.append(spool)
        if fresh.count:
            _log.info("chatter-otel: %d usage record(s) in the spool at %s from an earlier run; "
                      "replaying", fresh.count, self.spool_path)  # fmt: skip
        return fresh

    async def _main(self) -> None:
        engine = self._engine()
        state = _LoopState()
        self._retired: list[Spool] = []
        spool = self._reader(None, state)
        try:
            while True:
                stopping = self._stop.is_set() and not self._intake.pending()
                if not stopping:  # woken by the intake or a flush, else at the next deadline
                    # Blocking is fine: this event loop is the worker's own, with nothing else.
                    self._wake.wait(self._idle_s(state, spool))
                self._wake.clear()
                spool = self._reader(spool, state)
                now = time.monotonic()
                if (self._held or (spool is not None and spool.count)) and (
                    state.pending_since is None
                ):
                    state.pending_since = now
                if now >= state.next_try and (stopping or self._db_due(now, state, spool)):
                    spool = await self._db_round(engine, spool, state, stopping)
                if stopping:
                    break
        finally:
            await self._stopped(spool, engine)

    async def _db_round(
        self, engine: Any, spool: Spool | None, state: _LoopState, stopping: bool
    ) -> Spool | None:
        """Write what the spool and the held records hold, sweep the runs no message took; back
        off on a database failure; close a spool that cannot be read. Returns the spool."""
        try:
            try:
                await self._ensure_tables(engine)
            finally:
                self._first_check.set()
            written = 0
            for old in list(self._retired):
                written += await self._drain_retired(engine, old)
            if spool is not None:
                try:
                    written += await self._drain(engine, spool)
                except SpoolUnusable as exc:
                    warn_once("ledger:spool-read", "chatter-otel: usage spool at %s cannot be "
                              "read (%s); it is tried again, new records go straight to the "
                              "database meanwhile", self.spool_path, exc.__cause__)  # fmt: skip
                    with contextlib.suppress(sqlite3.Error):
                        spool.close()
                    spool = None
            written += await self._drain_held(engine)
            if not stopping and time.monotonic() >= state.next_sweep:
                await self._apply_due_runs(engine)  # and learns when the next falls due
                state.last_sweep = time.monotonic()
            state.next_sweep = self._next_sweep(state)
            if state.failing:
                _log.warning("chatter-otel: usage ledger reached the database again; "
                             "%d waiting record(s) written", written)  # fmt: skip
            state.backoff, state.failing, state.pending_since = 0.5, False, None
            handled = self._settled_now(spool)
            if handled is not None:
                if not self._intake.pending():
                    self._hurry.clear()  # every flush asked so far is done: batch again
                self._mark_settled(handled)
        except Exception as exc:  # the database is down or refused the batch
            self.stats["failures"] += 1
            state.failing = True
            waiting = len(self._held) + (spool.count if spool is not None else 0)
            warn_once("ledger:db", "chatter-otel: usage ledger cannot write to the database "
                      "(%s: %.300s); %d record(s) waiting (spool at %s, or in memory while it "
                      "cannot be written), retrying", type(exc).__name__, exc, waiting,
                      self.spool_path)  # fmt: skip
            state.next_try = time.monotonic() + state.backoff
            state.backoff = min(state.backoff * 2, 30.0)
        return spool

    async def _drain_retired(self, engine: Any, old: Spool) -> int:
        """What a set-aside file still gives, then it is closed (the file stays aside)."""
        try:
            written = await self._drain(engine, old)
        except SpoolUnusable as exc:
            _log.error("chatter-otel: the set-aside usage spool cannot be read further (%s); "
                       "its remaining records stay in the file for a person to look at",
                       exc.__cause__)  # fmt: skip
            written = 0
        self._retired.remove(old)
        with contextlib.suppress(sqlite3.Error):
            old.close()
        return written

    async def _drain_held(self, engine: Any) -> int:
        """The records the spool could not take, straight to the database in batches, oldest
        first. A batch the database refuses is retried one record at a time: a record it
        refuses while it answers cannot be kept aside (no spool), so it is dropped and counted
        with a log line; an outage puts the batch back, in order, and raises."""
        written = 0
        while True:
            with self._counter.lock:
                batch = [self._held.popleft() for _ in range(min(len(self._held),
                                                                 self.batch_size))]  # fmt: skip
            if not batch:
                self.stats["held"] = 0
                return written
            rows: list[SpoolRow] = [(0, kind, record) for kind, record in batch]
            try:
                async with engine.begin() as conn:
                    await self._apply_rows(conn, rows)
            except Exception:
                # One at a time. On an outage _isolate_held puts back what it did not get to
                # and raises; that raise is not caught by the clause below (a sibling), so the
                # batch goes back once, never twice (twice duplicated it: 37 records held and
                # counted as 74).
                written += await self._isolate_held(engine, rows)
                continue
            except BaseException:  # cancelled mid-batch: the batch goes back, in order
                with self._counter.lock:
                    self._held.extendleft(reversed(batch))
                raise
            written += len(batch)
            self.stats["written"] += len(batch)
            self.stats["held"] = len(self._held)

    async def _isolate_held(self, engine: Any, rows: list[SpoolRow]) -> int:
        written = 0
        for i, row in enumerate(rows):
            try:
                refused = await self._apply_alone(engine, row)
            except BaseException:
                with self._counter.lock:  # the rest goes back, in order
                    self._held.extendleft((kind, rec) for _, kind, rec in reversed(rows[i:]))
                raise
            if refused is None:
                written += 1
                self.stats["written"] += 1
                continue
            self._count_dropped(
                1,
                f"the database refused a {row[1]} record and no spool can "
                f"keep it aside ({type(refused).__name__}: {refused!s:.300})",
            )
        return written

    def _settled_now(self, spool: Spool | None) -> int | None:
        """``handled`` as of a moment nothing submitted was waiting (in memory, or in a spool
        this process wrote to), or None while something is."""
        with self._counter.lock:
            if self._held:
                return None
            if spool is not None:
                try:
                    if spool.pending():
                        return None
                except sqlite3.Error:
                    return None
                self._counter.value = 0
            elif self._counter.value:  # ours, in a spool this thread cannot read now
                return None
            self.stats["spooled"] = 0
            return self._counter.handled

    async def _stopped(self, spool: Spool | None, engine: Any) -> None:
        """Say what a stopping worker leaves behind, then close the spool and the engine. Held
        records the database did not take go to the spool if it can take them now; else they
        are lost, counted and said with their number."""
        with self._counter.lock:
            held = list(self._held)
            self._held.clear()
        if held:
            try:
                target = spool or self._open_spool()
                target.add(held)
                spool = target
            except (sqlite3.Error, OSError) as exc:
                self._count_dropped(len(held), f"the ledger stopped while neither the spool "
                                    f"({exc}) nor the database could take them")  # fmt: skip
        if spool is not None and spool.count:
            _log.warning("chatter-otel: usage ledger stopped with %d record(s) in the spool at "
                         "%s; they are written when it next starts", spool.count,
                         self.spool_path)  # fmt: skip
        for old in (*self._retired, spool):
            if old is not None:
                with contextlib.suppress(sqlite3.Error):
                    old.close()
        await engine.dispose()

    def _next_sweep(self, state: _LoopState) -> float:
        """When to look for runs no message took (streaming endpoints): when the earliest run
        this worker wrote unclaimed falls due, else (for runs a process that ended wrote)
        ``grace_s`` after the last look. It looked once a second before: a transaction and a
        query a second, per process, however idle the app."""
        now = time.monotonic()
        slow = now + max(self.grace_s, 1.0) if state.next_sweep <= now else state.next_sweep
        # At most one a second (as before) under a stream of runs falling due one by one.
        soonest = max(state.last_sweep + min(1.0, self.grace_s), now + 0.05)
        return max(min(slow, now + (self._sweep_due - time.time())), soonest)

    def _idle_s(self, state: _LoopState, spool: Spool | None) -> float:
        """How long the loop sleeps unless woken (the intake spooled or held records, a flush,
        the stop): until its next deadline (a batch's delay, the sweep, the end of a backoff,
        the next try to open the spool), at most a second. It polled every 50 ms before: 20
        wake-ups a second in an idle app."""
        if self._stop.is_set():
            return 0.05  # stopping: the intake's last records are on their way
        now = time.monotonic()
        due = state.next_sweep
        if state.pending_since is not None:
            due = min(due, state.pending_since + self.batch_delay_s)
        if state.next_try > now:
            due = max(due, state.next_try)  # backing off: nothing is written before
        if spool is None:
            due = min(due, state.next_open)
        return min(max(due - now, 0.0), 1.0)

    def _db_due(self, now: float, state: _LoopState, spool: Spool | None) -> bool:
        """The database in batches: one transaction per ``batch_delay_s`` (or a full batch, a
        flush, the sweep), not per record: each write takes interpreter time from the app."""
        waiting = len(self._held) + (spool.count if spool is not None else 0)
        return (
            self._hurry.is_set() or now >= state.next_sweep or waiting >= self.batch_size
            or bool(self._retired)
            or (state.pending_since is not None
                and now - state.pending_since >= self.batch_delay_s)
        )  # fmt: skip
