"""Locks a forked child gets fresh.

A lock that some thread holds at the instant of a ``fork`` stays held in the child for ever:
the thread that would release it is not there. Servers that load the app and then fork
workers (gunicorn ``--preload``) fork a process in which our sink workers run, and an app may
fork while one of its threads is inside a graph run. The workers themselves are re-made in the
child (``sinks/worker.py``, ``persistence/ledger.py``); the locks they share with the app's
threads are listed here and replaced in the child by new, free ones. What a lock guarded is
the child's copy of the parent's state as it was at the fork: a counter caught mid-update may
be off by that one update, never a deadlock.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["fresh_after_fork", "in_child_after_fork"]

_owners: list[tuple[weakref.ref[object], tuple[str, ...]]] = []
_callbacks: list[weakref.WeakMethod[Callable[[], object]]] = []
_guard = threading.Lock()


def fresh_after_fork(owner: object, *names: str) -> None:
    """After a fork, the child's ``owner`` gets a new ``threading.Lock`` for each of ``names``."""
    with _guard:
        _owners[:] = [(ref, n) for ref, n in _owners if ref() is not None]  # bounded by the live
        _owners.append((weakref.ref(owner), names))


def in_child_after_fork(method: Callable[[], object]) -> None:
    """Call the bound ``method`` in a forked child (after the locks are fresh), while its
    object lives: one registration with ``os.register_at_fork`` for all, and a list bounded
    by the live objects (a registration per object could never be undone: it grew with
    every object made)."""
    with _guard:
        _callbacks[:] = [ref for ref in _callbacks if ref() is not None]
        _callbacks.append(weakref.WeakMethod(method))


def _renew() -> None:
    global _guard  # noqa: PLW0603 - it may have been held at the fork too
    _guard = threading.Lock()
    for ref, names in _owners:
        owner = ref()
        if owner is not None:
            for name in names:
                setattr(owner, name, threading.Lock())
    for callback in _callbacks:
        method = callback()
        if method is not None:
            method()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew)
