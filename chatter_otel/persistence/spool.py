"""The local spool: pending usage records in a SQLite file, in order, durable across restarts."""

from __future__ import annotations

import json
import logging
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
SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    payload TEXT NOT NULL, error TEXT NOT NULL, at REAL NOT NULL);
"""


class SpoolCount:
    """What this process knows of the spool file, shared by its two connections (the intake
    adds, the database worker removes): ``value`` records in it, ``handled`` records the
    intake is done with (spooled, or dropped and counted), under one lock. A ``COUNT(*)`` per
    loop would cost more than the writes; the value is re-read when the file looks empty
    (another process sharing the file may have written and removed records)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0
        self.handled = 0


class Spool:
    """A connection to the local SQLite file of pending records, in order; survives a restart.
    Records the database refused wait in its ``quarantine`` table, with the error, for a person
    to look at. One connection per thread: the intake's and the database worker's."""

    def __init__(self, path: Path, counter: SpoolCount) -> None:
        self.bad = 0  # undecodable rows quarantined so far
        self.counter = counter
        # Used by one thread at a time; closed by whoever stops it (hence not same-thread only).
        self._db = connect_wal(
            path, timeout_s=SPOOL_BUSY_S, schema=SPOOL_SCHEMA, check_same_thread=False
        )
        self._resync()

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

    def settled_upto(self) -> int | None:
        """``handled`` as of a moment the file held nothing, or None if it holds records."""
        with self.counter.lock:
            if self._db.execute("SELECT 1 FROM spool LIMIT 1").fetchone() is not None:
                return None
            self.counter.value = 0
            return self.counter.handled

    def peek(self, n: int) -> list[SpoolRow]:
        """The oldest ``n`` rows, decoded. A row that does not decode (a corrupt payload) is
        quarantined here, counted in ``bad`` and logged: it never holds up the rows behind it."""
        rows = self._db.execute(
            "SELECT id, kind, payload FROM spool ORDER BY id LIMIT ?", (n,)
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
        """Fold the WAL back into the file and truncate it: the spool's WAL stays small."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def delete(self, upto: int) -> None:
        with self._db:
            gone = self._db.execute("DELETE FROM spool WHERE id <= ?", (upto,)).rowcount
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


def set_aside(path: Path, exc: sqlite3.DatabaseError) -> bool:
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


def decode(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TypeError(f"a {type(record).__name__}, not an object")
    if record.get("cost") is not None:
        record["cost"] = Decimal(str(record["cost"]))
    return record
