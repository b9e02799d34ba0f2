"""The local spool: pending usage records in a SQLite file, in order, durable across restarts."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from chatter_otel._safety import warn_once
from chatter_otel._sqlite import connect_wal

if TYPE_CHECKING:
    from pathlib import Path

_log = logging.getLogger("chatter_otel")

SpoolRow = tuple[int, str, dict[str, Any]]


# How long a spool statement waits for a lock: another process sharing the file (two workers
# left on the default path) holds its write lock only for one batch.
SPOOL_BUSY_S = 30.0
# The WAL is folded back (checkpoint TRUNCATE) once it passes this, whether or not the database
# is up: while it is down the spool grows by its records, not by a WAL that is never reset.
WAL_LIMIT_BYTES = 1 << 20
SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    payload TEXT NOT NULL, error TEXT NOT NULL, at REAL NOT NULL);
"""


class SpoolUnusable(Exception):
    """The spool could not be read or written (its cause says why): not a database fault."""


class SpoolCount:
    """What this process knows of the spool file, shared by its two connections (the intake
    adds, the database worker removes): ``value`` records in it, ``handled`` records the
    intake is done with (spooled, held in memory for the database, or dropped and counted),
    under one lock. A ``COUNT(*)`` per loop would cost more than the writes; the value is
    re-read when the file looks empty (another process sharing the file may have written and
    removed records). ``generation`` goes up when an unusable file is set aside for a fresh
    one, so the other connection knows to open the new file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0
        self.handled = 0
        self.generation = 0


class Spool:
    """A connection to the local SQLite file of pending records, in order; survives a restart.
    Records the database refused wait in its ``quarantine`` table, with the error, for a person
    to look at. One connection per thread: the intake's and the database worker's."""

    def __init__(self, path: Path, counter: SpoolCount) -> None:
        self.bad = 0  # undecodable rows quarantined so far
        self.counter = counter
        self.generation = counter.generation
        self.path = path
        # Rows up to this id are in the database: skipped by ``peek`` even while the disk is
        # too full to delete them (removed as soon as it can be).
        self.done_upto = 0
        self._undeleted = False
        self._adds = 0
        # Used by one thread at a time; closed by whoever stops it (hence not same-thread only).
        self._db = connect_wal(
            path, timeout_s=SPOOL_BUSY_S, schema=SPOOL_SCHEMA, check_same_thread=False
        )
        try:
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self._resync()
        except BaseException:
            self._db.close()
            raise

    @property
    def count(self) -> int:
        return self.counter.value

    def _resync(self) -> None:
        with self.counter.lock:
            self.counter.value = int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def add(self, batch: list[tuple[str, dict[str, Any]]], dropped: int = 0) -> None:
        """Append ``batch``; ``dropped`` more records were handled without a place in it."""
        payloads = [(kind, json.dumps(r, default=str)) for kind, r in batch]
        with self.counter.lock:
            if payloads:
                with self._db:
                    self._db.executemany("INSERT INTO spool (kind, payload) VALUES (?, ?)",
                                         payloads)  # fmt: skip
            self.counter.value += len(payloads)
            self.counter.handled += len(payloads) + dropped
        self._adds += 1
        if self._adds % 32 == 0:
            self.bound_wal()

    def bound_wal(self) -> None:
        """Fold a WAL grown past ``WAL_LIMIT_BYTES`` back into the file; a checkpoint that
        cannot run now (a full disk) is tried again later, said once a minute."""
        try:
            if os.path.getsize(f"{self.path}-wal") <= WAL_LIMIT_BYTES:
                return
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, OSError) as exc:
            warn_once("ledger:wal", "chatter-otel: usage spool at %s: cannot fold its WAL back "
                      "(%s); tried again later", self.path, exc)  # fmt: skip

    def pending(self) -> bool:
        """Whether the file holds a record not yet in the database (under ``counter.lock``)."""
        row = self._db.execute("SELECT 1 FROM spool WHERE id > ? LIMIT 1", (self.done_upto,))
        return row.fetchone() is not None

    def peek(self, n: int) -> list[SpoolRow]:
        """The oldest ``n`` rows, decoded. A row that does not decode (a corrupt payload) is
        quarantined here, counted in ``bad`` and logged: it never holds up the rows behind it."""
        if self._undeleted:
            self.delete(self.done_upto)
        rows = self._db.execute(
            "SELECT id, kind, payload FROM spool WHERE id > ? ORDER BY id LIMIT ?",
            (self.done_upto, n),
        ).fetchall()
        if not rows:  # another process sharing the file may have written (and removed) ours
            self._resync()
        out: list[SpoolRow] = []
        for i, kind, payload in rows:
            try:
                record = decode(json.loads(payload))
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
        """Fold the WAL back into the file and truncate it: the spool's WAL stays small. One
        that cannot run now (a full disk) is tried again later."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            warn_once("ledger:wal", "chatter-otel: usage spool at %s: cannot fold its WAL back "
                      "(%s); tried again later", self.path, exc)  # fmt: skip

    def delete(self, upto: int) -> None:
        """Rows up to ``upto`` are in the database: remove them. A disk too full for the delete
        is said once a minute; the rows are skipped meanwhile (``done_upto``) and removed by a
        later call, never written twice by this process (a replay elsewhere is idempotent)."""
        self.done_upto = max(self.done_upto, upto)
        try:
            with self._db:
                gone = self._db.execute("DELETE FROM spool WHERE id <= ?", (upto,)).rowcount
        except (sqlite3.Error, OSError) as exc:
            self._undeleted = True
            warn_once("ledger:spool-delete", "chatter-otel: usage spool at %s: records written "
                      "to the database cannot be removed from it yet (%s); they are skipped "
                      "and removed later", self.path, exc)  # fmt: skip
            return
        self._undeleted = False
        self._remove(gone)

    def _remove(self, gone: int) -> None:
        with self.counter.lock:
            self.counter.value = max(self.counter.value - gone, 0)

    def quarantine(self, row_id: int, error: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO quarantine (id, kind, payload, error, at)"
                " SELECT id, kind, payload, ?, ? FROM spool WHERE id = ?",
                (error[:2000], time.time(), row_id),
            )  # fmt: skip
            gone = self._db.execute("DELETE FROM spool WHERE id = ?", (row_id,)).rowcount
        self._remove(gone)

    def close(self) -> None:
        self._db.close()


def set_aside(path: Path, exc: sqlite3.DatabaseError, counter: SpoolCount) -> bool:
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
    with counter.lock:
        counter.generation += 1
        lost, counter.value = counter.value, 0
    _log.error("chatter-otel: usage spool at %s was unusable (%s: %s); moved to %s, a fresh "
               "spool is used (%d record(s) of this process not yet written were in it: they "
               "are still written from there as far as it can be read)", path,
               type(exc).__name__, exc, aside, lost)  # fmt: skip
    return True


def decode(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TypeError(f"a {type(record).__name__}, not an object")
    if record.get("cost") is not None:
        record["cost"] = Decimal(str(record["cost"]))
    return record
