"""OTEL_SEMCONV_STABILITY_OPT_IN: default names, the newest GenAI names, or both."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph

from chatter_otel import last_run


class S(TypedDict, total=False):
    n: int


def _run(mode: str = "sync") -> Any:
    """Runs the graph; the run as ``last_run()`` gives it where it ran."""

    def step(state: S) -> S:
        return {"n": state["n"] + 1}

    g = StateGraph(S)
    g.add_node("step", step)
    g.add_node("helper", RunnableLambda(step),
               metadata={"gen_ai.agent.name": "helper", "gen_ai.agent.id": "agent-1"})  # fmt: skip
    g.add_edge(START, "step")
    g.add_edge("step", "helper")
    g.add_edge("helper", END)
    graph = g.compile(name="flow")
    if mode == "sync":
        assert graph.invoke({"n": 0}) == {"n": 2}
        return last_run()

    async def main() -> Any:
        assert await graph.ainvoke({"n": 0}) == {"n": 2}
        return last_run()

    return asyncio.run(main())


# (env value, kwarg) -> (workflow name keys, agent id kept)
CASES = [
    (None, None, {"gen_ai.workflow.name"}, True),
    ("gen_ai_latest_experimental", None, {"gen_ai.agent.name"}, False),
    ("http, gen_ai_latest_experimental", None, {"gen_ai.agent.name"}, False),
    ("gen_ai_latest_experimental/dup", None, {"gen_ai.workflow.name", "gen_ai.agent.name"}, True),
    ("gen_ai_latest_experimental,gen_ai_latest_experimental/dup", None,
     {"gen_ai.workflow.name", "gen_ai.agent.name"}, True),
    ("database/dup", None, {"gen_ai.workflow.name"}, True),
    ("gen_ai_latest_experimental", "default", {"gen_ai.workflow.name"}, True),  # kwarg wins
    (None, "gen_ai_latest_experimental", {"gen_ai.agent.name"}, False),
]  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("env", "kwarg", "keys", "agent_id"), CASES)
def test_modes(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, env: str | None, kwarg: str | None,
    keys: set[str], agent_id: bool, mode: str,
) -> None:  # fmt: skip
    if env is None:
        monkeypatch.delenv("OTEL_SEMCONV_STABILITY_OPT_IN", raising=False)
    else:
        monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", env)
    spans = instrument(**({"semconv_opt_in": kwarg} if kwarg else {}))
    run = _run(mode)
    wf = spans.one("invoke_workflow flow")
    a = wf.attributes
    assert a["gen_ai.operation.name"] == "invoke_workflow"  # the same in every mode
    present = {k for k in ("gen_ai.workflow.name", "gen_ai.agent.name") if k in a}
    assert present == keys
    assert all(a[k] == "flow" for k in keys)
    agent = spans.one("invoke_agent helper")
    assert agent.attributes["gen_ai.agent.name"] == "helper"
    assert ("gen_ai.agent.id" in agent.attributes) is agent_id
    if agent_id:
        assert agent.attributes["gen_ai.agent.id"] == "agent-1"
    # what the processors read does not change with the mode
    assert run is not None and run.name == "flow" and run.record is not None
    assert run.workflow_id == format(wf.context.span_id, "016x")  # this very run
    assert run.record.span_name == "invoke_workflow flow"


def test_bad_values_warn_and_fall_back(
    instrument: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_newest")
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        spans = instrument()
    assert "ignoring 'gen_ai_newest' in OTEL_SEMCONV_STABILITY_OPT_IN" in caplog.text
    _run()
    assert spans.one("invoke_workflow flow").attributes["gen_ai.workflow.name"] == "flow"

    from chatter_otel import LangGraphInstrumentor

    LangGraphInstrumentor().uninstrument()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        spans = instrument(semconv_opt_in="latest")
    assert "ignoring semconv_opt_in='latest'" in caplog.text
    _run()
    assert "gen_ai.workflow.name" in spans.one("invoke_workflow flow").attributes
