"""``UsagePersistence``: the ledger's public object, its queue and its worker thread."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Observation

from chatter_otel._forksafe import in_child_after_fork
from chatter_otel._safety import warn_once
from chatter_otel.attributes import (
    LEDGER_DROPPED_METRIC,
    LEDGER_QUARANTINED_METRIC,
    LEDGER_SPOOLED_METRIC,
    LEDGER_WRITTEN_METRIC,
)
from chatter_otel.persistence.binding import BindingHooks
from chatter_otel.persistence.committed import CommittedRows
from chatter_otel.persistence.dbloop import DatabaseLoop
from chatter_otel.persistence.schema import MessageMapping
from chatter_otel.persistence.spool import Spool, SpoolCount, set_aside
from chatter_otel.persistence.writer import LedgerWriter
from chatter_otel.sinks.worker import BoundedWorker
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.metrics import MeterProvider
    from sqlalchemy import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from chatter_otel.persistence.one_statement import WriteStatement


_log = logging.getLogger("chatter_otel")

__all__ = ["UsagePersistence"]

_STARTUP_WAIT_S = 2.0
_SPOOL_RETRY_S = 2.0  # a spool that cannot be written is tried again this often


class UsagePersistence(BindingHooks, DatabaseLoop, LedgerWriter):
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
        self.stats = {"written": 0, "spooled": 0, "held": 0, "dropped": 0, "quarantined": 0,
                      "applied": 0, "failures": 0, "in_transaction": 0,
                      "in_transaction_refused": 0}  # fmt: skip
        # Stage 1, the intake: the one bounded worker design (drop counter, re-made after a
        # fork) moves records from memory to the spool file at once, in whatever batch is queued.
        self._intake: BoundedWorker[tuple[str, dict[str, Any]]] = BoundedWorker(
            "ledger-intake", self._to_spool, max_queue=max_queue, max_batch=batch_size,
            start=False,
        )  # fmt: skip
        self._counter = SpoolCount()
        self._intake_spool: Spool | None = None  # the intake thread's connection
        self._spool_retry_at = 0.0  # monotonic: the spool is not tried again before
        self._spool_down_since: float | None = None
        # Records the spool could not take, for the database thread (under _counter.lock).
        self._held: deque[tuple[str, dict[str, Any]]] = deque()
        self._max_held = max_queue
        self._held_total = 0
        # Stage 2, the database worker: its own thread, event loop and engine.
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the intake spooled something, or a flush is asked
        self._hurry = threading.Event()  # flush() or close(): write now, do not wait for a batch
        self._settle = threading.Condition()
        self._settled = 0  # SpoolCount.handled as of the last time the spool was seen empty
        self._installed: list[Any] = []
        self._committed = CommittedRows(max_queue)  # rows the app's transactions wrote
        self._ready = False  # our tables created
        self._write: WriteStatement | None = None  # see persistence/one_statement.py
        self._message_columns: frozenset[str] = frozenset()
        self._conversations_ok = False
        self._schema_checked = -1e9  # monotonic time the app's tables were last looked at
        self._first_check = threading.Event()  # the worker has tried the database once
        in_child_after_fork(self._after_fork)

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
        self._committed = CommittedRows(self._max_held)  # its lock may have been held
        self._intake_spool = None
        self._held = deque()  # the parent's: written (or spooled) by the parent
        self._spool_retry_at, self._spool_down_since, self._held_total = 0.0, None, 0
        self._settle = threading.Condition()
        self._wake, self._hurry = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._first_check = threading.Event()
        self._settled = 0
        if self._thread is not None:
            self._start_thread()

    @property
    def writes_in_transaction(self) -> bool:
        """True once the worker has seen our tables and the app's conversations table: from
        then on a run's accounting is written in the app's transaction that saves its message
        (before that, by the worker after the commit)."""
        return self._ready and self._conversations_ok

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

        meter = our_meter(meter_provider)
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

    # -- stage 1: the intake thread, memory -> spool (or straight to the database) -------------

    def _to_spool(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Append ``batch`` to the spool, as far as ``max_spool`` leaves room (the rest is
        dropped and counted). While the spool cannot be written (locked by another process,
        corrupt, read-only, a full disk) the batch is held in memory for the database thread to
        write straight to the database, and the spool is tried again every few seconds: a
        broken spool never holds records back from a database that is up."""
        now = time.monotonic()
        if now >= self._spool_retry_at:
            try:
                spool = self._intake_spool or self._open_spool()
                self._intake_spool = spool
                room = max(self.max_spool - spool.count, 0)
                spool.add(batch[:room], dropped=max(len(batch) - room, 0))
            except (sqlite3.Error, OSError) as exc:
                self._spool_unwritable(exc, len(batch))
            else:
                self._spool_writable()
                self.stats["spooled"] = spool.count
                if room < len(batch):
                    self._count_dropped(len(batch) - room, "the spool is full "
                                        f"({self.max_spool} records)")  # fmt: skip
                self._wake.set()
                return
        self._hold(batch)

    def _spool_unwritable(self, exc: BaseException, n: int) -> None:
        why = "the disk is full" if "full" in str(exc).lower() else f"{type(exc).__name__}: {exc}"
        if self._spool_down_since is None:
            self._spool_down_since = time.monotonic()
            _log.warning("chatter-otel: usage spool at %s cannot be written (%s); %d record(s) "
                         "go straight to the database until it can", self.spool_path, why,
                         n)  # fmt: skip
        self._spool_retry_at = time.monotonic() + _SPOOL_RETRY_S
        spool = self._intake_spool
        # Locked, full or read-only: the connection is fine. Anything else (corrupt): closed,
        # and the file reopened (and set aside) at the next try.
        if spool is not None and not isinstance(exc, sqlite3.OperationalError | OSError):
            self._intake_spool = None
            with contextlib.suppress(sqlite3.Error):
                spool.close()

    def _spool_writable(self) -> None:
        if self._spool_down_since is not None:
            _log.warning("chatter-otel: usage spool at %s can be written again after %.1f s; "
                         "%d record(s) went straight to the database meanwhile",
                         self.spool_path, time.monotonic() - self._spool_down_since,
                         self._held_total)  # fmt: skip
            self._spool_down_since = None
            self._held_total = 0

    def _hold(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Records for the database thread to write without the spool; bounded by
        ``max_queue`` records (beyond it dropped and counted, exactly)."""
        with self._counter.lock:
            room = max(self._max_held - len(self._held), 0)
            self._held.extend(batch[:room])
            self._counter.handled += len(batch)
            self._held_total += min(room, len(batch))
            self.stats["held"] = len(self._held)
        if room < len(batch):
            self._count_dropped(len(batch) - room, "neither the spool nor the database can "
                                "take them")  # fmt: skip
        self._wake.set()

    def _count_dropped(self, n: int, why: str) -> None:
        self.stats["dropped"] += n
        _log.error("chatter-otel: usage ledger dropped %d record(s): %s (%d dropped in all)",
                   n, why, self.stats["dropped"])  # fmt: skip

    def _open_spool(self) -> Spool:
        """A connection to the spool; a file that is unusable (corrupt, not a database) is set
        aside and a fresh one opened at once. Raises while it cannot be opened (locked by
        another process, an unwritable folder), saying so once a minute."""
        try:
            return Spool(self.spool_path, self._counter)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and set_aside(
                self.spool_path, exc, self._counter
            ):
                return Spool(self.spool_path, self._counter)
            warn_once("ledger:spool-open", "chatter-otel: usage spool at %s cannot be opened "
                      "(%s: %s); retrying", self.spool_path, type(exc).__name__,
                      exc)  # fmt: skip
            raise
