"""The bounded run-id -> run map behind the callback handler.

LangChain reports starts and ends as separate callbacks keyed by run id; a run whose end never
comes (a dropped generator, a crashed worker) must not keep its span, and memory, forever. The map
is capped in size and age; what falls out is handed to ``on_evict``, which ends its span as
orphaned. Entries keep insertion order, so the oldest is always first.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Generic, TypeVar

from chatter_otel._forksafe import fresh_after_fork

if TYPE_CHECKING:
    from collections.abc import Callable
    from uuid import UUID

V = TypeVar("V")

_SWEEP_EVERY = 256  # age checks ride along every N inserts; no timer thread


class Registry(Generic[V]):
    def __init__(
        self, max_entries: int, max_age_s: float, on_evict: Callable[[UUID, V], None]
    ) -> None:
        self._entries: dict[UUID, tuple[float, V]] = {}
        self._max = max_entries
        self._max_age = max_age_s
        self._on_evict = on_evict
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
        self._puts = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: UUID | None) -> V | None:
        entry = self._entries.get(key) if key is not None else None
        return entry[1] if entry is not None else None

    def pop(self, key: UUID) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
        return entry[1] if entry is not None else None

    def put(self, key: UUID, value: V) -> None:
        now = time.monotonic()
        out: list[tuple[UUID, V]] = []
        with self._lock:
            self._entries[key] = (now, value)
            while len(self._entries) > self._max:
                old = next(iter(self._entries))
                out.append((old, self._entries.pop(old)[1]))
            self._puts += 1
            if self._puts % _SWEEP_EVERY == 0:
                limit = now - self._max_age
                while self._entries:
                    old = next(iter(self._entries))
                    born, value_old = self._entries[old]
                    if born >= limit:
                        break
                    del self._entries[old]
                    out.append((old, value_old))
        if out:
            self.evicted += len(out)
            for old_key, old_value in out:
                self._on_evict(old_key, old_value)

    def drain(self) -> list[tuple[UUID, V]]:
        """Remove and return everything (at uninstrument or shutdown)."""
        with self._lock:
            items = [(k, v) for k, (_, v) in self._entries.items()]
            self._entries.clear()
        return items
