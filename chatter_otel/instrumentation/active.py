"""The callback handler of the instrumentation currently installed (one per process, like
``BaseInstrumentor``'s own state). Apart from the handler's module, so that ``track_workflow``
and the hooks reach it without importing LangChain."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatter_otel.instrumentation.callbacks import OtelCallbackHandler

__all__ = ["active_handler", "set_active_handler"]

_active: OtelCallbackHandler | None = None


def active_handler() -> OtelCallbackHandler | None:
    """The handler of the instrumentor currently installed, if any."""
    return _active


def set_active_handler(handler: OtelCallbackHandler | None) -> None:
    global _active  # noqa: PLW0603 - one process-wide instrumentation, like BaseInstrumentor
    _active = handler
