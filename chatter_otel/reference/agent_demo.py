"""``chatter-otel demo --agents``: a prebuilt ReAct agent and a human-in-the-loop graph paused by
an interrupt and resumed, on embedded defaults (the local model, the local trace store).

The agent is LangChain's ``create_agent`` when ``langchain`` is installed, else LangGraph's
``create_react_agent`` (the same loop, deprecated since LangGraph 1.0). The approval graph drafts
an answer, asks a human (``interrupt``), and sends it once resumed with ``Command(resume=...)``:
two traces, the second linked to the first.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from chatter_otel.reference.demo import get_weather
from chatter_otel.reference.local_model import LocalChatModel

__all__ = ["AgentDemo", "build_approval_graph", "build_weather_agent", "run_agent_demo"]


def build_weather_agent() -> Any:
    """A prebuilt ReAct agent named ``weather`` on the local model, with one tool."""
    try:
        from langchain.agents import create_agent
    except ImportError:  # langchain not installed: LangGraph's own prebuilt agent
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_react_agent(LocalChatModel(), [get_weather], name="weather")
    return create_agent(LocalChatModel(), [get_weather], name="weather")


class Draft(TypedDict, total=False):
    question: str
    draft: str
    approved: bool


def build_approval_graph(checkpointer: Any = None) -> Any:
    """draft (an LLM call) -> review (``interrupt``: a human approves) -> send. ``checkpointer``:
    where the pause is kept (in memory when not given; one every worker shares, such as a
    ``PostgresSaver``, to resume on another worker)."""
    model = LocalChatModel()

    def draft(state: Draft) -> Draft:
        return {"draft": str(model.invoke(state["question"]).content)}

    def review(state: Draft) -> Draft:
        return {"approved": interrupt({"approve": state["draft"]}) == "yes"}

    def send(state: Draft) -> Draft:
        return {}

    g = StateGraph(Draft)
    g.add_node("draft", draft)
    g.add_node("review", review)
    g.add_node("send", send)
    g.add_edge(START, "draft")
    g.add_edge("draft", "review")
    g.add_edge("review", "send")
    g.add_edge("send", END)
    return g.compile(name="approval", checkpointer=checkpointer or InMemorySaver())


@dataclass
class AgentDemo:
    agent_tree: str
    paused_tree: str
    resumed_tree: str
    store_path: str


def run_agent_demo(store_path: str | None = None) -> AgentDemo:
    """Run both through ``configure`` and read their traces back from the local store."""
    from chatter_otel import last_run
    from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
    from chatter_otel.setup import configure
    from chatter_otel.traces import spans as _tree

    telemetry = configure(
        service_name="chatter-otel-demo", exporter="local", trace_store=store_path,
        set_global=False, prices=LOCAL_MODEL_PRICES,
    )  # fmt: skip
    store = telemetry.trace_store
    assert store is not None
    trace_ids: list[str] = []
    try:
        build_weather_agent().invoke({"messages": [HumanMessage("Weather in Oslo?")]})
        trace_ids.append(_trace_of(last_run()))
        graph = build_approval_graph()
        cfg: Any = {"configurable": {"thread_id": f"demo-{uuid.uuid4().hex[:8]}"}}
        graph.invoke({"question": "Can I return my order?"}, cfg)
        trace_ids.append(_trace_of(last_run()))
        graph.invoke(Command(resume="yes"), cfg)
        trace_ids.append(_trace_of(last_run()))
        telemetry.force_flush()
        trees = [_tree.render(store.trace(t)) for t in trace_ids]
        path = str(store.path)
    finally:
        telemetry.shutdown()
    return AgentDemo(trees[0], trees[1], trees[2], path)


def _trace_of(run: Any) -> str:
    assert run is not None and run.trace_id is not None, "the run was not traced"
    return str(run.trace_id)
