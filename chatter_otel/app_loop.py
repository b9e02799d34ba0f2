"""The app's event loop, as the correlation middleware last saw it on a request: where events
forwarded to an app's async ``emit`` are run (``sinks.forward``). One app loop per process."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["app_loop", "note_app_loop"]

_app_loop: asyncio.AbstractEventLoop | None = None


def note_app_loop() -> None:
    """Remember the app's running event loop (called by the middleware on a request)."""
    global _app_loop  # noqa: PLW0603 - one app loop per process
    with contextlib.suppress(RuntimeError):  # not in a loop: nothing to note
        _app_loop = asyncio.get_running_loop()


def app_loop() -> asyncio.AbstractEventLoop | None:
    return _app_loop
