"""One background thread per sink kind, so the app's thread never waits for a sink.

``submit`` is non-blocking: when the bounded queue is full the call is dropped and counted (with
a rate-limited log line). A sink that raises is logged and skipped; one that is slow only backs
up its own queue.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from chatter_otel._safety import warn_once


class SinkWorker:
    def __init__(self, name: str, max_queue: int = 10_000) -> None:
        self.name = name
        self._queue: queue.Queue[tuple[Any, tuple[Any, ...], dict[str, Any]] | None] = queue.Queue(
            maxsize=max_queue
        )
        self.dropped = 0
        self.failed = 0
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name=f"chatter-otel-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.stopped:
            return
        try:
            self._queue.put_nowait((fn, args, kwargs))
        except queue.Full:
            self.dropped += 1
            warn_once(f"worker:{self.name}:full", "chatter-otel: %s sink is behind; dropped %d "
                      "call(s) so far", self.name, self.dropped)  # fmt: skip

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, args, kwargs = item
                try:
                    fn(*args, **kwargs)
                except Exception:
                    self.failed += 1
                    warn_once(f"worker:{self.name}:raised", "chatter-otel: the %s sink raised; "
                              "call skipped", self.name, exc_info=True)  # fmt: skip
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until everything submitted so far was handled."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def stop(self) -> None:
        """End the thread once what is queued has been handled."""
        if not self.stopped:
            self.stopped = True
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
