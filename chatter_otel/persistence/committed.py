"""The rows the app's own transaction wrote: what the worker need not write again.

A run's records are spooled when its spans end, before the app saves its message; when the
app's transaction then writes them (the in-transaction write) and commits, the worker's later
replay of the spooled records would change nothing (``ON CONFLICT DO NOTHING``, the run already
claimed). So the commit notes their ids here, and the worker drops those records from a batch
instead of writing them: a batch made only of them costs no database round trip. Bounded: an
id that falls out is simply replayed, which changes nothing. Ids are kept at most ``max_age_s``
(the worker reads spooled records within ``batch_delay_s``): a commit the worker read the
records before (a request slower than the batch delay) would otherwise leave its ids here
until the bound pushed them out. Only a commit notes ids: a rollback leaves them to the worker.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from chatter_otel.persistence.spool import SpoolRow

__all__ = ["CommittedRows"]


class CommittedRows:
    def __init__(self, limit: int, max_age_s: float = 60.0) -> None:
        # id -> when noted (monotonic); insertion order: the oldest first, and falls out first
        self._ids: dict[tuple[str, str], float] = {}
        self._limit = limit
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self.skipped = 0  # spooled records not written again, since start

    def add(self, workflow_id: str, span_ids: Iterable[str]) -> None:
        """A run (its row and its call rows) committed in the app's transaction."""
        now = time.monotonic()
        with self._lock:
            self._ids[("run", workflow_id)] = now
            for span_id in span_ids:
                self._ids[("llm", span_id)] = now
            ids, old = self._ids, now - self._max_age_s
            while ids:
                oldest = next(iter(ids))
                if len(ids) <= self._limit and ids[oldest] >= old:
                    break
                del ids[oldest]

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
