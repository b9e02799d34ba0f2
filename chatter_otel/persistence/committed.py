"""The rows the app's own transaction wrote: what the worker need not write again.

A run's records are spooled when its spans end, before the app saves its message; when the
app's transaction then writes them (the in-transaction write) and commits, the worker's later
replay of the spooled records would change nothing (``ON CONFLICT DO NOTHING``, the run already
claimed). So the commit notes their ids here, and the worker drops those records from a batch
instead of writing them: a batch made only of them costs no database round trip. Bounded: an
id that falls out (or a commit the worker reads the records before) is simply replayed, which
changes nothing. Only a commit notes ids: a rollback leaves them to the worker.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from chatter_otel.persistence.spool import SpoolRow

__all__ = ["CommittedRows"]


class CommittedRows:
    def __init__(self, limit: int) -> None:
        self._ids: dict[tuple[str, str], None] = {}  # insertion order: the oldest falls out
        self._limit = limit
        self._lock = threading.Lock()
        self.skipped = 0  # spooled records not written again, since start

    def add(self, workflow_id: str, span_ids: Iterable[str]) -> None:
        """A run (its row and its call rows) committed in the app's transaction."""
        with self._lock:
            self._ids[("run", workflow_id)] = None
            for span_id in span_ids:
                self._ids[("llm", span_id)] = None
            while len(self._ids) > self._limit:
                del self._ids[next(iter(self._ids))]

    def unwritten(self, rows: list[SpoolRow]) -> list[SpoolRow]:
        """``rows`` without the records the app's transaction committed (forgotten here once
        seen: each is spooled once)."""
        if not self._ids:
            return rows
        out: list[SpoolRow] = []
        with self._lock:
            for row in rows:
                kind, record = row[1], row[2]
                key = record.get("span_id" if kind == "llm" else "workflow_id")
                if kind in ("llm", "run") and isinstance(key, str) and (kind, key) in self._ids:
                    del self._ids[kind, key]
                    self.skipped += 1
                else:
                    out.append(row)
        return out

    def clear(self) -> None:
        with self._lock:
            self._ids.clear()
