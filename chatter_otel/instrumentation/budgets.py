"""Budgets: what runs and conversations spend against the app's limits (``BudgetOptions``).

Every LLM call's tokens and cost are added to its run (by the run's root workflow id) and to
its conversation; the first time a total crosses a limit, the call's span gets a
``chatter.budget.exceeded`` event and the counter ``chatter.budget.exceeded`` is incremented.
A run over a limit is remembered until it ends, so that the next node boundary can raise the
app's exception (``BudgetOptions.raise_error``). State is bounded: open runs are forgotten when
they end (and, like the run registry, at most ``max_runs`` are kept); conversations are an LRU
of 10,000.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel.attributes import (
    BUDGET_EXCEEDED,
    BUDGET_EXCEEDED_METRIC,
    CHATTER_BUDGET_LIMIT,
    CHATTER_BUDGET_THRESHOLD,
    CHATTER_BUDGET_VALUE,
)
from chatter_otel.version import our_meter

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span

    from chatter_otel.instrumentation.records import LLMCallRecord
    from chatter_otel.options import BudgetOptions

__all__ = ["BudgetTracker"]

_MAX_CONVERSATIONS = 10_000


class _Spend:
    __slots__ = ("cost", "crossed", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.cost = 0.0
        self.crossed: set[str] = set()


class BudgetTracker:
    def __init__(self, options: BudgetOptions, max_runs: int,
                 meter_provider: MeterProvider | None = None) -> None:  # fmt: skip
        self.options = options
        self._max_runs = max_runs
        self._runs: OrderedDict[str, _Spend] = OrderedDict()
        self._conversations: OrderedDict[str, _Spend] = OrderedDict()
        self._over: dict[str, str] = {}  # root id -> what it crossed first (for the raise)
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")
        self._exceeded = our_meter(meter_provider).create_counter(
            BUDGET_EXCEEDED_METRIC, unit="{run}",
            description="Runs and conversations that crossed a budget limit, by limit.",
        )  # fmt: skip

    def spent(self, rec: LLMCallRecord, root_id: str | None, span: Span) -> None:
        """Add one call; mark the limits it crossed (on its span, in the counter)."""
        o = self.options
        tokens = rec.total_tokens or 0
        cost = float(rec.cost) if rec.cost is not None else 0.0
        crossed: list[tuple[str, float, float]] = []
        with self._lock:
            if root_id is not None:
                run = self._get(self._runs, root_id, self._max_runs)
                for gone in [r for r in self._over if r not in self._runs]:
                    del self._over[gone]  # a run the cap let go of: bounded like the runs
                run.tokens += tokens
                run.cost += cost
                crossed += self._check(run, "run", o.run_tokens, o.run_cost)
            conv_id = rec.ids.conversation_id
            if conv_id is not None:
                conv = self._get(self._conversations, conv_id, _MAX_CONVERSATIONS)
                conv.tokens += tokens
                conv.cost += cost
                crossed += self._check(conv, "conversation", o.conversation_tokens,
                                       o.conversation_cost)  # fmt: skip
            if crossed and root_id is not None:
                self._over.setdefault(root_id, crossed[0][0])
        for limit, value, threshold in crossed:
            self._exceeded.add(1, {CHATTER_BUDGET_LIMIT: limit})
            if span.is_recording():
                span.add_event(BUDGET_EXCEEDED, {CHATTER_BUDGET_LIMIT: limit,
                                                 CHATTER_BUDGET_VALUE: value,
                                                 CHATTER_BUDGET_THRESHOLD: threshold})  # fmt: skip

    @staticmethod
    def _get(table: OrderedDict[str, _Spend], key: str, cap: int) -> _Spend:
        spend = table.get(key)
        if spend is None:
            spend = table[key] = _Spend()
            while len(table) > cap:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return spend

    @staticmethod
    def _check(spend: _Spend, scope: str, tokens: int | None,
               cost: float | None) -> list[tuple[str, float, float]]:  # fmt: skip
        out = []
        for kind, value, limit in (("tokens", spend.tokens, tokens), ("cost", spend.cost, cost)):
            name = f"{scope}_{kind}"
            if limit is not None and value > limit and name not in spend.crossed:
                spend.crossed.add(name)
                out.append((name, float(value), float(limit)))
        return out

    def over(self, root_id: str | None, conversation_id: str | None = None) -> str | None:
        """The limit a run crossed first (or its conversation crossed, in any run), if any."""
        with self._lock:
            found = self._over.get(root_id) if root_id is not None else None
            conv = self._conversations.get(conversation_id) if conversation_id else None
            if found is None and conv is not None and conv.crossed:
                found = min(conv.crossed)
            return found

    def ended(self, root_id: str | None) -> None:
        if root_id is not None:
            with self._lock:
                self._runs.pop(root_id, None)
                self._over.pop(root_id, None)

    def raise_for(self, root_id: str | None, conversation_id: str | None = None) -> None:
        """Raise the app's exception when the run (or its conversation) is over a limit and
        the app asked for it."""
        error = self.options.raise_error
        limit = self.over(root_id, conversation_id) if error is not None else None
        if error is not None and limit is not None:
            raise error(f"chatter-otel budget exceeded: {limit}")


def tracker(options: Any, max_runs: int, meter_provider: Any) -> BudgetTracker | None:
    """A tracker when the app set any limit; None otherwise (nothing is counted then)."""
    from chatter_otel.options import BudgetOptions

    if not isinstance(options, BudgetOptions):
        return None
    limits = (options.run_tokens, options.run_cost, options.conversation_tokens,
              options.conversation_cost)  # fmt: skip
    return BudgetTracker(options, max_runs, meter_provider) if any(
        v is not None for v in limits) else None  # fmt: skip
