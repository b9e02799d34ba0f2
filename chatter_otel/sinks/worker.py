"""The one background worker design, for every sink that must not run on the app's thread.

Like the SDK's ``BatchProcessor``: a bounded queue (``submit`` never blocks; when full the new
item is dropped and counted, with a rate-limited log line), one daemon thread handling items in
order and in batches, ``flush`` with a deadline, and re-creation in a forked child
(``_forksafe.in_child_after_fork``): servers that load the app and then fork workers get a
working sink in every worker. Items queued in the parent at the fork stay the parent's: the
child starts empty.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from chatter_otel._forksafe import in_child_after_fork
from chatter_otel._safety import internal_error, warn_once

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BoundedWorker", "SinkWorker"]

T = TypeVar("T")


class BoundedWorker(Generic[T]):
    """Hands queued items to ``handle(batch)`` on a daemon thread named ``chatter-otel-NAME``."""

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        *,
        max_queue: int = 10_000,
        max_batch: int = 512,
        start: bool = True,
    ) -> None:
        self.name = name
        self._handle = handle
        self._max_queue = max_queue
        self._max_batch = max_batch
        self.dropped = 0
        self.failed = 0
        self.stopped = False
        self._started = start
        self._reset()
        in_child_after_fork(self._at_fork_reinit)

    def _reset(self) -> None:
        self._queue: deque[T] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._thread = threading.Thread(
            target=self._run, name=f"chatter-otel-{self.name}", daemon=True
        )
        if self._started:
            self._thread.start()

    def start(self) -> None:
        """Start the thread of a worker made with ``start=False`` (idempotent)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def _at_fork_reinit(self) -> None:
        # The parent's thread does not exist here and its lock may have been held at the fork.
        if not self.stopped:
            self._reset()

    def submit(self, item: T) -> bool:
        if self.stopped:
            return False
        with self._cond:
            if len(self._queue) >= self._max_queue:
                self.dropped += 1
                dropped = self.dropped
            else:
                self._queue.append(item)
                self._submitted += 1
                self._cond.notify()
                return True
        warn_once(f"worker:{self.name}:full", "chatter-otel: the %s sink is behind; %d item(s) "
                  "dropped so far", self.name, dropped)  # fmt: skip
        return False

    def _run(self) -> None:
        cond, queue = self._cond, self._queue  # this thread's, even after a fork re-creates them
        while True:
            with cond:
                while not queue and not self.stopped:
                    cond.wait()
                if not queue:
                    return  # stopped and drained
                batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            try:
                self._handle(batch)
            except Exception:
                self.failed += len(batch)
                internal_error(f"worker:{self.name}")
            with cond:
                self._done += len(batch)
                cond.notify_all()

    def pending(self) -> bool:
        """Items submitted and not yet handled (queued or in hand)."""
        return self._done < self._submitted

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until everything submitted so far was handled."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout_s)

    def stop(self, timeout_s: float = 0.0) -> None:
        """End the thread once what is queued has been handled (waits up to ``timeout_s``)."""
        with self._cond:
            self.stopped = True
            self._cond.notify_all()
        if timeout_s and self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class SinkWorker(BoundedWorker[tuple[Any, tuple[Any, ...], dict[str, Any]]]):
    """Calls into an app's own sink (its MonitoringService, its push hook), in order. A call
    that raises is logged and counted and skips only itself."""

    def __init__(self, name: str, max_queue: int = 10_000) -> None:
        super().__init__(name, self._call_all, max_queue=max_queue)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        return self.submit((fn, args, kwargs))

    def _call_all(self, batch: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> None:
        for fn, args, kwargs in batch:
            try:
                fn(*args, **kwargs)
            except Exception:
                self.failed += 1
                warn_once(f"worker:{self.name}:raised", "chatter-otel: the %s sink raised; "
                          "call skipped", self.name, exc_info=True)  # fmt: skip
