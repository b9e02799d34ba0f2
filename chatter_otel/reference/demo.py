"""The reference chat workflow and the demo that runs it on embedded defaults.

Graph: ``agent`` (a chat model with tools bound) -> conditional edge (``tools_condition``) ->
``tools`` (a ``ToolNode``) -> back to ``agent`` -> end. On the local model, one user question
makes 2 LLM calls and 1 tool call.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

from chatter_otel.reference.local_model import LocalChatModel

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = ["ChatState", "DemoResult", "build_chat_graph", "get_weather", "run_demo"]


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    forecasts = {"paris": "18°C, light rain", "tokyo": "24°C, clear", "oslo": "3°C, snow"}
    return f"{city}: {forecasts.get(city.lower(), '20°C, sunny')}"


def build_chat_graph(model: BaseChatModel | None = None, tools: list[Any] | None = None) -> Any:
    """The reference workflow, compiled. ``model`` defaults to the deterministic local model."""
    tools = tools or [get_weather]
    bound = (model or LocalChatModel()).bind_tools(tools)

    def agent(state: ChatState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    async def aagent(state: ChatState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    from langchain_core.runnables import RunnableLambda

    graph = StateGraph(ChatState)
    graph.add_node("agent", RunnableLambda(agent, afunc=aagent, name="agent"))
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "agent")
    return graph.compile(name="chat")


@dataclass
class DemoResult:
    trace_id: str
    correlation_id: str
    answer: str
    tree: str
    usage: Any
    store_path: str


def run_demo(
    question: str = "What is the weather in Paris?", store_path: str | None = None
) -> DemoResult:
    """Run the workflow once through ``configure`` on embedded defaults (the local trace store),
    then read its trace back from the store, as ``chatter-otel trace`` would."""
    from chatter_otel.instrumentation.workflow import track_workflow
    from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
    from chatter_otel.setup import configure
    from chatter_otel.traces import spans as _tree

    telemetry = configure(
        service_name="chatter-otel-demo",
        exporter="local",
        trace_store=store_path,
        set_global=False,
        prices=LOCAL_MODEL_PRICES,
    )
    store = telemetry.trace_store
    try:
        graph = build_chat_graph()
        correlation_id = f"demo-{uuid.uuid4().hex[:12]}"
        conversation_id = f"conv-{uuid.uuid4().hex[:8]}"
        with track_workflow(
            "chat", conversation_id=conversation_id, user_id="demo-user",
            correlation_id=correlation_id,
        ) as run:  # fmt: skip
            out = graph.invoke({"messages": [HumanMessage(question)]})
        telemetry.force_flush()
        assert store is not None and run.trace_id is not None
        tree = _tree.render(store.trace(run.trace_id))
        path = str(store.path)
    finally:
        telemetry.shutdown()
    return DemoResult(
        trace_id=run.trace_id,
        correlation_id=correlation_id,
        answer=str(out["messages"][-1].content),
        tree=tree,
        usage=run.usage,
        store_path=path,
    )
