"""Budgets (opt-in): per run and per conversation limits; crossing one is an event on the call
that crossed it and a count; the app's own exception at the next node when it asks for one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatter_otel import BudgetOptions, track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}


class OverBudget(Exception):  # the app's own
    pass


def _setup(instrument: Any, **limits: Any) -> tuple[Any, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    spans = instrument(prices=LOCAL_MODEL_PRICES, budgets=BudgetOptions(**limits),
                       meter_provider=MeterProvider([reader]))  # fmt: skip
    return spans, reader


def _exceeded(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    return {p.attributes["chatter.budget.limit"]: p.value
            for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics
            for m in sm.metrics if m.name == "chatter.budget.exceeded"
            for p in m.data.data_points}  # fmt: skip


def test_a_run_over_its_token_budget_is_marked_and_goes_on(instrument: Any) -> None:
    # the reference run: two LLM calls, 6+2 then 10+9 tokens (27 in all)
    spans, reader = _setup(instrument, run_tokens=10)
    out = build_chat_graph().invoke(Q)
    assert "Paris" in str(out["messages"][-1].content)  # no raise_error: the run goes on
    first, second = sorted(spans.named("chat chatter-local-1"), key=lambda s: s.start_time)
    assert [e.name for e in first.events] == []
    (event,) = [e for e in second.events if e.name == "chatter.budget.exceeded"]
    assert dict(event.attributes or {}) == {"chatter.budget.limit": "run_tokens",
                                            "chatter.budget.value": 27.0,
                                            "chatter.budget.threshold": 10.0}  # fmt: skip
    assert _exceeded(reader) == {"run_tokens": 1}
    build_chat_graph().invoke(Q)  # a new run: counted from zero, crosses once more
    assert _exceeded(reader) == {"run_tokens": 2}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_app_s_exception_at_the_next_node(instrument: Any, mode: str) -> None:
    """The first call crosses the cost limit; the run's next node (tools) does not start: the
    app's exception comes out of the graph, the run is failed with its type."""
    spans, reader = _setup(instrument, run_cost=0.000001, raise_error=OverBudget)
    graph = build_chat_graph()
    with pytest.raises(OverBudget, match="budget exceeded: run_cost"):
        if mode == "sync":
            graph.invoke(Q)
        else:
            asyncio.run(graph.ainvoke(Q))
    assert len(spans.named("chat chatter-local-1")) == 1
    assert spans.named("execute_tool get_weather") == []
    (wf,) = spans.named("invoke_workflow chat")
    assert str(wf.attributes["error.type"]).endswith("OverBudget")  # the app's, as raised
    assert _exceeded(reader) == {"run_cost": 1}
    # the limit was the run's: the next run starts, and stops the same way
    with pytest.raises(OverBudget):
        graph.invoke(Q)
    assert _exceeded(reader) == {"run_cost": 2}


def test_a_conversation_budget_spans_runs(instrument: Any) -> None:
    spans, reader = _setup(instrument, conversation_tokens=50, raise_error=OverBudget)
    graph = build_chat_graph()
    for _ in range(2):  # 27 + 27 = 54 > 50 on the second run's last call
        with track_workflow("turn", conversation_id="conv-budget"):
            graph.invoke(Q)
    assert _exceeded(reader) == {"conversation_tokens": 1}
    calls = len(spans.named("chat chatter-local-1"))
    with pytest.raises(OverBudget), track_workflow("turn", conversation_id="conv-budget"):
        graph.invoke(Q)  # the conversation is over already: the run's first node never starts
    assert len(spans.named("chat chatter-local-1")) == calls
    assert _exceeded(reader) == {"conversation_tokens": 1}  # crossed once, counted once
    with track_workflow("turn", conversation_id="another"):
        graph.invoke(Q)  # another conversation is not limited by this one


def test_no_limit_no_tracking(instrument: Any) -> None:
    spans, reader = _setup(instrument)
    build_chat_graph().invoke(Q)
    assert _exceeded(reader) == {}
    assert all(e.name != "chatter.budget.exceeded" for s in spans.all for e in s.events)
