"""Option objects for ``configure``: the keywords that belong together, typed (as logfire
groups its own). Each field is documented in docs/configuration.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BudgetOptions", "EventOptions", "MonitoringOptions"]


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


@dataclass(frozen=True)
class BudgetOptions:
    """``configure(budgets=BudgetOptions(...))`` (or ``instrument(budgets=...)``): opt-in
    limits on what runs spend. ``run_tokens``/``run_cost``: one run of the app's (its outermost
    workflow, nested graphs included); ``conversation_tokens``/``conversation_cost``: one
    ``gen_ai.conversation.id``, counted in this process since it started (the 10,000 most
    recently active conversations; the usage ledger is the durable record). Costs in USD.

    Crossing a limit adds a ``chatter.budget.exceeded`` event to the LLM call that crossed it
    and counts ``chatter.budget.exceeded`` (by ``chatter.budget.limit``), once per run and
    limit. ``raise_error``: an exception class of the app's; given, the run's next node does
    not start: it raises ``raise_error(message)`` instead (the one case where the package
    raises into the app, because the app asked)."""

    run_tokens: int | None = None
    run_cost: float | None = None
    conversation_tokens: int | None = None
    conversation_cost: float | None = None
    raise_error: type[BaseException] | None = None
