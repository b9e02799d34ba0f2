"""Opening the package's own SQLite files (the usage spool, the local trace store)."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_WAL_TRIES = 6  # 20 ms, doubling: ~0.6 s in all


def connect_wal(
    path: Path, *, timeout_s: float, schema: str, check_same_thread: bool = True
) -> sqlite3.Connection:
    """A connection to ``path`` (created with its folder) in WAL mode, ``synchronous=NORMAL``,
    with ``schema`` (``CREATE ... IF NOT EXISTS`` statements) applied; closed again if any of
    that fails, so a caller that retries leaks nothing.

    WAL without a sync per commit survives the process crashing or restarting, at the cost of
    the last commits on a power loss. The mode is kept in the file; switching a new file to it
    needs an exclusive lock that SQLite refuses at once, without waiting ``timeout_s``, when two
    connections race for it (two processes starting on one file), so the switch is made only
    when needed and retried briefly. Other statements wait up to ``timeout_s`` for a lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=timeout_s, check_same_thread=check_same_thread)
    try:
        for attempt in range(_WAL_TRIES):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == _WAL_TRIES - 1:
                    raise
                time.sleep(0.02 * 2**attempt)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn
