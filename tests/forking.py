"""A test's body run in a forked child (POSIX), and what it said back."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable


def in_forked_child(
    body: Callable[[], str],
    *,
    after_fork: Callable[[], None] | None = None,
    timeout_s: float = 60.0,
) -> str:
    """Fork; the child runs ``body`` and exits with what it returned, the parent runs
    ``after_fork`` (if any) and returns it. A child that fails fails the test; one that is
    still running after ``timeout_s`` (a lock held for ever) is killed, and fails it too."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read)
            os.write(write, body().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        if after_fork is not None:
            after_fork()
        deadline = time.monotonic() + timeout_s
        while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        if done == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish in {timeout_s:g} s (hung)")
        assert os.WEXITSTATUS(done[1]) == 0, "the forked child failed"
        return pipe.read().decode()
