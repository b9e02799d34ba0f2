"""Wrap a library's module when the app imports it, never before.

Instrumenting imports nothing the app has not imported (no provider SDK, no LangChain module it
does not use: ``benchmarks/bench_startup.py`` measures ``configure()`` and checks it): each
module we wrap is wrapped now if the app has imported it, else by a post-import hook when it
does. A post-import hook cannot be unregistered, so each module gets one hook for the life of
the process, and a hook that fires while we are uninstrumented wraps nothing.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

__all__ = ["WhenImported"]


class WhenImported:
    """One module to wrap: ``install(wrap)`` wraps it now or when imported; ``remove()``
    unwraps it (with ``unwrap``) if it was wrapped."""

    def __init__(self, module: str, unwrap: Callable[[ModuleType], None]) -> None:
        self.module = module
        self._unwrap = unwrap
        self._wrap: Callable[[ModuleType], None] | None = None  # set while instrumented
        self._wrapped: ModuleType | None = None
        self._hooked = False

    def install(self, wrap: Callable[[ModuleType], None]) -> None:
        self._wrap = wrap
        module = sys.modules.get(self.module)
        if module is not None:
            self._on_import(module)
        elif not self._hooked:
            from wrapt import register_post_import_hook

            register_post_import_hook(self._on_import, self.module)
            self._hooked = True

    def remove(self) -> None:
        self._wrap = None
        module, self._wrapped = self._wrapped, None
        if module is not None:
            self._unwrap(module)

    def _on_import(self, module: ModuleType) -> None:
        wrap = self._wrap
        if wrap is None or self._wrapped is not None:
            return  # uninstrumented before the import, or wrapped already
        wrap(module)
        self._wrapped = module
