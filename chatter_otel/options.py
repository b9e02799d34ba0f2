"""Option objects for ``configure``: the keywords that belong together, typed (as logfire
groups its own). Each field is documented in docs/configuration.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["EventOptions", "MonitoringOptions"]


@dataclass(frozen=True)
class MonitoringOptions:
    """``configure(monitoring=MonitoringOptions(...))``: how runs reach a MonitoringService.

    ``service``: ``True`` for the built-in one, the app's own object, or ``False`` (off).
    ``llm_metrics``: the app's class for ``record_llm_operation`` (built from the fields it
    declares). ``timestamps``: ``"epoch"`` for a service that takes float timestamps.
    ``mode``: ``"fill"`` (a run the app tracks itself with empty usage is filled, not doubled)
    or ``"parallel"`` (both entries, side by side).
    ``correct_app_usage``: where the app reported a run's usage itself (its service's updates,
    its own workflow events) with other numbers than measured, write the measured ones over
    them; off, they are left as the app wrote them (counted in ``chatter.usage.app_mismatch``
    and logged either way).
    """

    service: Any = True
    llm_metrics: type | None = None
    timestamps: Literal["datetime", "epoch"] = "datetime"
    mode: Literal["fill", "parallel"] = "fill"
    correct_app_usage: bool = False


@dataclass(frozen=True)
class EventOptions:
    """``configure(events=EventOptions(...))``: where lifecycle events go.

    ``bus``: ``True`` for the built-in ``EventBus``, the app's own bus, or ``False`` (off).
    ``forward_to``: the app's own event function (sync or async); every event is forwarded to
    it, off the app's thread. ``converter``: turns a ``UnifiedEvent`` into the app's event
    class first (``chatter_otel.sinks.forward.app_event_converter``).
    """

    bus: Any = True
    forward_to: Callable[[Any], Any] | None = None
    converter: Callable[[Any], Any] | None = None
