"""The span tree of real LangGraph runs, through every entry point."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LocalChatModel

QUESTION = {"messages": [HumanMessage("What is the weather in Paris?")]}


# State types live at module level: LangGraph resolves their annotations by name.
class Count(TypedDict):
    n: int


class Msgs(TypedDict):
    messages: list


class Fan(TypedDict):
    cities: list[str]
    answers: Annotated[list[str], operator.add]


# The contract's names, spelled out once here on purpose: a renamed constant must fail a test.
WF = {
    "gen_ai.operation.name",
    "gen_ai.workflow.name",
    "chatter.llm.calls",
    "chatter.tool.calls",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.cost.amount",
    "gen_ai.usage.cost.currency",
    "gen_ai.usage.cost.source",
}
CHAT = {
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.response.id",
    "gen_ai.response.finish_reasons",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.request.stream",
    "gen_ai.usage.cost.amount",
    "gen_ai.usage.cost.currency",
    "gen_ai.usage.cost.source",
}


def assert_reference_tree(spans: Any, *, stream: bool = False) -> None:
    """The reference tree: workflow > agent > chat, tools > execute_tool, agent > chat."""
    wf = spans.one("invoke_workflow chat")
    assert wf.kind is SpanKind.INTERNAL
    assert wf.parent is None
    nodes = spans.children(wf)
    assert [n.name for n in nodes] == [
        "invoke_node agent",
        "invoke_node tools",
        "invoke_node agent",
    ]
    assert [n.attributes["langgraph.node.name"] for n in nodes] == ["agent", "tools", "agent"]
    assert [n.attributes["langgraph.step"] for n in nodes] == [1, 2, 3]
    chats = spans.named("chat chatter-local-1")
    assert len(chats) == 2
    assert spans.parent_of(chats[0]) is nodes[0] or spans.parent_of(chats[1]) is nodes[0]
    assert {spans.parent_of(c).context.span_id for c in chats} == {
        nodes[0].context.span_id,
        nodes[2].context.span_id,
    }
    tool = spans.one("execute_tool get_weather")
    assert spans.parent_of(tool) is nodes[1]
    for c in chats:
        assert c.kind is SpanKind.CLIENT
        assert set(c.attributes) >= CHAT, CHAT - set(c.attributes)
        a = c.attributes
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "chatter.local"
        assert a["gen_ai.request.model"] == "chatter-local-1"
        assert a["gen_ai.response.model"] == "chatter-local-1"
        assert isinstance(a["gen_ai.usage.input_tokens"], int)
        assert isinstance(a["gen_ai.usage.output_tokens"], int)
        assert isinstance(a["gen_ai.usage.cost.amount"], float)
        assert a["gen_ai.usage.cost.currency"] == "USD"
        assert a["gen_ai.usage.cost.source"] == "local"
        assert a["gen_ai.request.stream"] is stream
        assert a["gen_ai.response.id"].startswith("local-")
        assert "chatter.usage.missing" not in a
    first, second = sorted(chats, key=lambda s: s.start_time)
    assert first.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert second.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    ta = tool.attributes
    assert ta["gen_ai.operation.name"] == "execute_tool"
    assert ta["gen_ai.tool.name"] == "get_weather"
    assert ta["gen_ai.tool.call.id"].startswith("call_")
    assert tool.kind is SpanKind.INTERNAL
    # roll-ups equal the sums over the chat spans
    assert set(wf.attributes) >= WF, WF - set(wf.attributes)
    w = wf.attributes
    assert w["gen_ai.operation.name"] == "invoke_workflow"
    assert w["gen_ai.workflow.name"] == "chat"
    assert w["chatter.llm.calls"] == 2
    assert w["chatter.tool.calls"] == 1
    assert w["gen_ai.usage.input_tokens"] == sum(
        c.attributes["gen_ai.usage.input_tokens"] for c in chats
    )
    assert w["gen_ai.usage.output_tokens"] == sum(
        c.attributes["gen_ai.usage.output_tokens"] for c in chats
    )
    assert w["gen_ai.usage.cost.amount"] == pytest.approx(
        sum(c.attributes["gen_ai.usage.cost.amount"] for c in chats), rel=1e-12
    )
    # one trace, all OK
    assert {s.context.trace_id for s in spans.all} == {wf.context.trace_id}
    assert all(s.status.status_code is StatusCode.UNSET for s in spans.all)


def test_invoke(spans: Any) -> None:
    out = build_chat_graph().invoke(QUESTION)
    assert out["messages"][-1].content == "Here is what I found: Paris: 18°C, light rain"
    assert_reference_tree(spans)
    # LangGraph's __start__ pseudo node gets no span
    assert not spans.named("invoke_node __start__")


async def test_ainvoke(spans: Any) -> None:
    out = await build_chat_graph().ainvoke(QUESTION)
    assert out["messages"][-1].content.startswith("Here is what I found")
    assert_reference_tree(spans)


def test_stream_updates(spans: Any) -> None:
    updates = list(build_chat_graph().stream(QUESTION, stream_mode="updates"))
    assert [next(iter(u)) for u in updates] == ["agent", "tools", "agent"]
    assert_reference_tree(spans)


def test_stream_messages_mode_streams_the_model(spans: Any) -> None:
    chunks = list(build_chat_graph().stream(QUESTION, stream_mode="messages"))
    assert chunks  # token chunks reached the app
    assert_reference_tree(spans, stream=True)
    for chat in spans.named("chat chatter-local-1"):
        ttfc = chat.attributes["gen_ai.response.time_to_first_chunk"]
        assert isinstance(ttfc, float) and 0 < ttfc < 5


async def test_astream(spans: Any) -> None:
    items = [c async for c in build_chat_graph().astream(QUESTION)]
    assert len(items) == 3
    assert_reference_tree(spans)


async def test_astream_events_v2(spans: Any) -> None:
    kinds = [e["event"] async for e in build_chat_graph().astream_events(QUESTION, version="v2")]
    assert "on_chat_model_stream" in kinds and "on_tool_end" in kinds
    assert_reference_tree(spans, stream=True)


def test_batch_runs_are_separate_traces(spans: Any) -> None:
    graph = build_chat_graph()
    outs = graph.batch([QUESTION, {"messages": [HumanMessage("weather in Oslo")]}])
    assert outs[1]["messages"][-1].content == "Here is what I found: Oslo: 3°C, snow"
    wfs = spans.named("invoke_workflow chat")
    assert len(wfs) == 2
    assert wfs[0].context.trace_id != wfs[1].context.trace_id
    for wf in wfs:
        tid = wf.context.trace_id
        in_trace = [s for s in spans.all if s.context.trace_id == tid]
        assert sorted(s.name for s in in_trace) == sorted(
            [
                "invoke_workflow chat",
                "invoke_node agent",
                "invoke_node agent",
                "invoke_node tools",
                "chat chatter-local-1",
                "chat chatter-local-1",
                "execute_tool get_weather",
            ]
        )


async def test_concurrent_runs_never_mix(spans: Any) -> None:
    graph = build_chat_graph()
    cities = [f"City{i}" for i in range(12)]

    async def one(city: str) -> Any:
        cfg = {"configurable": {"thread_id": f"conv-{city}"}}
        return await graph.ainvoke({"messages": [HumanMessage(f"weather in {city}")]}, cfg)

    outs = await asyncio.gather(*(one(c) for c in cities))
    assert [o["messages"][-1].content.split(": ")[1] for o in outs] == cities
    wfs = spans.named("invoke_workflow chat")
    assert len(wfs) == len(cities)
    for wf in wfs:
        conv = wf.attributes["gen_ai.conversation.id"]
        in_trace = [s for s in spans.all if s.context.trace_id == wf.context.trace_id]
        assert len(in_trace) == 7
        # every span of the trace carries that trace's own conversation id
        assert {s.attributes["gen_ai.conversation.id"] for s in in_trace} == {conv}
        tool = next(s for s in in_trace if s.name == "execute_tool get_weather")
        # the tool's call id is derived from the conversation's own messages
        assert tool.attributes["gen_ai.tool.call.id"].startswith("call_")


def test_user_spans_inside_a_node_are_children_of_the_node(spans: Any) -> None:
    tracer = trace.get_tracer("app", tracer_provider=spans.provider)

    def work(state: Count) -> Count:
        with tracer.start_as_current_span("app.lookup"), tracer.start_as_current_span("app.inner"):
            pass
        return {"n": state["n"] + 1}

    async def awork(state: Count) -> Count:
        with tracer.start_as_current_span("app.alookup"):
            await asyncio.sleep(0)
        return {"n": state["n"] + 1}

    def route(state: Count) -> str:  # a conditional edge's function runs in the node it leaves
        with tracer.start_as_current_span("app.route"):
            return END

    g = StateGraph(Count)
    g.add_node("work", work)
    g.add_edge(START, "work")
    g.add_conditional_edges("work", route, [END])
    graph = g.compile()
    assert graph.invoke({"n": 1}) == {"n": 2}
    node = spans.one("invoke_node work")
    assert spans.parent_of(spans.one("app.lookup")) is node
    assert spans.parent_of(spans.one("app.inner")) is spans.one("app.lookup")
    assert spans.parent_of(spans.one("app.route")) is node

    async def aroute(state: Count) -> str:
        with tracer.start_as_current_span("app.aroute"):
            await asyncio.sleep(0)
            return END

    g2 = StateGraph(Count)
    g2.add_node("awork", awork)
    g2.add_edge(START, "awork")
    g2.add_conditional_edges("awork", aroute, [END])
    assert asyncio.run(g2.compile().ainvoke({"n": 1})) == {"n": 2}
    anode = spans.one("invoke_node awork")
    assert spans.parent_of(spans.one("app.alookup")) is anode
    assert spans.parent_of(spans.one("app.aroute")) is anode


def _subgraph() -> Any:
    model = LocalChatModel()

    def think(state: Msgs) -> Msgs:
        return {"messages": [*state["messages"], model.invoke(state["messages"])]}

    sg = StateGraph(Msgs)
    sg.add_node("think", think)
    sg.add_edge(START, "think")
    sg.add_edge("think", END)
    return sg.compile(name="inner")


def test_subgraph_added_as_node_nests_as_workflow(spans: Any) -> None:
    model = LocalChatModel()

    def first(state: Msgs) -> Msgs:
        return {"messages": [*state["messages"], model.invoke(state["messages"])]}

    g = StateGraph(Msgs)
    g.add_node("first", first)
    g.add_node("inner", _subgraph())
    g.add_edge(START, "first")
    g.add_edge("first", "inner")
    g.add_edge("inner", END)
    graph = g.compile(name="outer")
    graph.invoke({"messages": [HumanMessage("hi there")]})

    outer = spans.one("invoke_workflow outer")
    inner_node = spans.one("invoke_node inner")
    inner_wf = spans.one("invoke_workflow inner")
    assert spans.parent_of(inner_node) is outer
    assert spans.parent_of(inner_wf) is inner_node
    think = spans.one("invoke_node think")
    assert spans.parent_of(think) is inner_wf
    chats = spans.named("chat chatter-local-1")
    assert len(chats) == 2
    inner_chat = next(c for c in chats if spans.parent_of(c) is think)
    # nested roll-up: inner counts its own call; outer counts both, once each
    assert inner_wf.attributes["chatter.llm.calls"] == 1
    assert (
        inner_wf.attributes["gen_ai.usage.input_tokens"]
        == inner_chat.attributes["gen_ai.usage.input_tokens"]
    )
    assert outer.attributes["chatter.llm.calls"] == 2
    assert outer.attributes["gen_ai.usage.input_tokens"] == sum(
        c.attributes["gen_ai.usage.input_tokens"] for c in chats
    )
    assert "chatter.workflow.id" in outer.attributes
    assert "chatter.workflow.id" not in inner_wf.attributes


def test_subgraph_invoked_inside_a_node(spans: Any) -> None:
    inner = _subgraph()

    def call_inner(state: Msgs) -> Msgs:
        return {"messages": inner.invoke({"messages": state["messages"]})["messages"]}

    g = StateGraph(Msgs)
    g.add_node("call_inner", call_inner)
    g.add_edge(START, "call_inner")
    g.add_edge("call_inner", END)
    g.compile(name="outer").invoke({"messages": [HumanMessage("hello")]})
    node = spans.one("invoke_node call_inner")
    inner_wf = spans.one("invoke_workflow inner")
    assert spans.parent_of(inner_wf) is node
    assert spans.one("invoke_workflow outer").attributes["chatter.llm.calls"] == 1


def test_send_fan_out_keeps_parents(spans: Any) -> None:
    model = LocalChatModel()

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        return {"answers": [model.invoke(f"weather {state['city']}").content]}

    def fan(state: Fan) -> list[Send]:
        return [Send("ask", {"city": c}) for c in state["cities"]]

    g = StateGraph(Fan)
    g.add_node("ask", ask)
    g.add_conditional_edges(START, fan, ["ask"])
    g.add_edge("ask", END)
    out = g.compile(name="fan").invoke({"cities": ["A", "B", "C", "D"], "answers": []})
    assert sorted(out["answers"]) == [f"You said: weather {c}" for c in "ABCD"]
    wf = spans.one("invoke_workflow fan")
    asks = spans.named("invoke_node ask")
    assert len(asks) == 4
    assert all(spans.parent_of(a) is wf for a in asks)
    chats = spans.named("chat chatter-local-1")
    assert {spans.parent_of(c).context.span_id for c in chats} == {a.context.span_id for a in asks}
    assert wf.attributes["chatter.llm.calls"] == 4


def test_parallel_tool_calls_keep_their_parent(spans: Any) -> None:
    from langchain_core.tools import tool
    from langgraph.prebuilt import ToolNode

    @tool
    def double(x: int) -> int:
        """Double x."""
        return 2 * x

    calls = [{"name": "double", "args": {"x": i}, "id": f"call_{i}"} for i in range(5)]

    g = StateGraph(Msgs)
    g.add_node("tools", ToolNode([double]))
    g.add_edge(START, "tools")
    g.add_edge("tools", END)
    out = g.compile(name="par").invoke({"messages": [AIMessage("", tool_calls=calls)]})
    assert [m.content for m in out["messages"]] == ["0", "2", "4", "6", "8"]
    node = spans.one("invoke_node tools")
    tools = spans.named("execute_tool double")
    assert len(tools) == 5
    assert all(spans.parent_of(t) is node for t in tools)
    assert sorted(t.attributes["gen_ai.tool.call.id"] for t in tools) == [
        f"call_{i}" for i in range(5)
    ]
    assert spans.one("invoke_workflow par").attributes["chatter.tool.calls"] == 5


def test_thread_id_and_metadata_ids_on_every_span(spans: Any) -> None:
    config = {
        "configurable": {"thread_id": "thread-7"},
        "metadata": {"user_id": "u-1", "message_id": "01HMSG", "correlation_id": "req-9"},
    }
    build_chat_graph().invoke(QUESTION, config)
    for s in spans.all:
        assert s.attributes["gen_ai.conversation.id"] == "thread-7", s.name
        assert s.attributes["user.id"] == "u-1", s.name
        assert s.attributes["chatter.message.id"] == "01HMSG", s.name
        assert s.attributes["chatter.correlation.id"] == "req-9", s.name


def test_the_apps_config_is_not_mutated(spans: Any) -> None:
    config = {"configurable": {"thread_id": "t"}}
    build_chat_graph().invoke(QUESTION, config)
    assert config == {"configurable": {"thread_id": "t"}}
