"""`invoke_agent` spans: prebuilt agents (LangChain's create_agent, LangGraph's
create_react_agent) and graphs or nodes the app marks as agents, against the loopback server."""

from __future__ import annotations

import asyncio
import warnings
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from opentelemetry.trace import SpanKind, StatusCode

from chatter_otel import last_run

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

MODEL = "gpt-4o-mini"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def broken(a: int) -> int:
    """Always fails."""
    raise ValueError("no")


def _llm(server: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.url, api_key="k", max_retries=0, **kw)


def _ask() -> dict[str, Any]:
    return {"messages": [HumanMessage("what is 2 + 3?")]}


def _agent_tree(spans: Any, agent: ReadableSpan, name: str) -> None:
    """The shape of a ReAct loop that called ``add`` once: model, tools, model under the agent;
    the LLM and tool spans name the agent."""
    nodes = spans.children(agent)
    loop = ["invoke_node model", "invoke_node tools", "invoke_node model"]
    assert [n.name for n in nodes] == loop
    chats = spans.named(f"chat {MODEL}")
    assert len(chats) == 2
    for chat in chats:
        assert spans.parent_of(chat).name == "invoke_node model"
        assert spans.parent_of(spans.parent_of(chat)) is agent
        assert chat.attributes["gen_ai.agent.name"] == name
        assert "gen_ai.agent.id" not in chat.attributes
    t = spans.one("execute_tool add")
    assert spans.parent_of(t) is nodes[1]
    assert t.attributes["gen_ai.agent.name"] == name
    assert t.attributes["gen_ai.tool.name"] == "add"


def _assert_agent_span(agent: ReadableSpan, name: str) -> None:
    a = agent.attributes
    assert agent.kind is SpanKind.INTERNAL
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert a["gen_ai.agent.name"] == name
    assert "gen_ai.workflow.name" not in a
    # roll-ups like a workflow: two calls of 23 + 7 tokens, one tool call
    assert a["chatter.llm.calls"] == 2
    assert a["chatter.tool.calls"] == 1
    assert a["gen_ai.usage.input_tokens"] == 46
    assert a["gen_ai.usage.output_tokens"] == 14
    assert a["chatter.usage.total_tokens"] == 60
    assert isinstance(a["gen_ai.usage.cost.amount"], float)


def test_create_agent_sync(spans: Any, openai_server: Any) -> None:
    openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
    agent = create_agent(_llm(openai_server), [add], name="helper")
    out = agent.invoke(_ask())
    assert out["messages"][-1].content == openai_server.content
    span = spans.one("invoke_agent helper")
    assert span.parent is None
    _assert_agent_span(span, "helper")
    _agent_tree(spans, span, "helper")
    assert spans.named("invoke_workflow helper") == []
    run = last_run()
    assert run is not None and run.name == "helper" and run.status == "ok"
    assert run.usage.prompt_tokens == 46 and run.usage.llm_calls == 2
    assert run.record is not None and run.record.agent is True
    assert run.record.span_name == "invoke_agent helper"


def test_create_react_agent_async(spans: Any, openai_server: Any) -> None:
    from langgraph.prebuilt import create_react_agent

    openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in LangGraph 1.0 in favour of create_agent
        agent = create_react_agent(_llm(openai_server), [add], name="researcher")
    asyncio.run(agent.ainvoke(_ask()))
    span = spans.one("invoke_agent researcher")
    _assert_agent_span(span, "researcher")
    nodes = spans.children(span)
    loop = ["invoke_node agent", "invoke_node tools", "invoke_node agent"]
    assert [n.name for n in nodes] == loop
    t = spans.one("execute_tool add")
    assert t.attributes["gen_ai.agent.name"] == "researcher"
    for chat in spans.named(f"chat {MODEL}"):
        assert chat.attributes["gen_ai.agent.name"] == "researcher"


def test_create_agent_streamed(spans: Any, openai_server: Any) -> None:
    openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
    agent = create_agent(_llm(openai_server, stream_usage=True), [add], name="helper")
    chunks = list(agent.stream(_ask(), stream_mode="messages"))
    assert chunks
    span = spans.one("invoke_agent helper")
    _assert_agent_span(span, "helper")
    _agent_tree(spans, span, "helper")
    assert all(c.attributes["gen_ai.request.stream"] is True for c in spans.named(f"chat {MODEL}"))


def test_agent_errors(spans: Any, openai_server: Any) -> None:
    openai_server.tool_calls.append([("broken", {"a": 1})])
    agent = create_agent(_llm(openai_server), [broken], name="fragile")
    openai_server.status = 200
    with pytest.raises(ValueError, match="no"):
        agent.invoke(_ask())  # create_agent's tool node re-raises by default
    span = spans.one("invoke_agent fragile")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    t = spans.one("execute_tool broken")
    assert t.attributes["error.type"] == "ValueError"
    assert t.attributes["gen_ai.agent.name"] == "fragile"

    spans.clear()
    openai_server.status = 500
    import openai

    with pytest.raises(openai.InternalServerError) as info:
        agent.invoke(_ask())
    cls = type(info.value)  # the class the app caught (langchain-openai's subclass), unwrapped
    span = spans.one("invoke_agent fragile")
    assert span.attributes["error.type"] == f"{cls.__module__}.{cls.__qualname__}"
    assert spans.one(f"chat {MODEL}").attributes["gen_ai.agent.name"] == "fragile"


class Notes(TypedDict, total=False):
    topic: str
    plan: str
    text: str


def _marked_graph(server: Any) -> Any:
    prompt = ChatPromptTemplate.from_messages([("user", "plan {topic}")])
    chain = prompt | _llm(server)

    def planner(state: Notes) -> Notes:
        return {"plan": str(chain.invoke({"topic": state["topic"]}).content)}

    async def aplanner(state: Notes) -> Notes:
        return {"plan": str((await chain.ainvoke({"topic": state["topic"]})).content)}

    def writer(state: Notes) -> Notes:
        return {"text": str(_llm(server).invoke("write").content)}

    g = StateGraph(Notes)
    meta = {"gen_ai.agent.name": "planner", "gen_ai.agent.id": "agent-7",
            "gen_ai.agent.description": "Plans the answer"}  # fmt: skip
    from langchain_core.runnables import RunnableLambda

    g.add_node("plan", RunnableLambda(planner, afunc=aplanner), metadata=meta)
    g.add_node("writer", writer)
    g.add_edge(START, "plan")
    g.add_edge("plan", "writer")
    g.add_edge("writer", END)
    return g.compile(name="notes")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_node_marked_as_agent(spans: Any, openai_server: Any, mode: str) -> None:
    graph = _marked_graph(openai_server)
    if mode == "sync":
        graph.invoke({"topic": "tea"})
    else:
        asyncio.run(graph.ainvoke({"topic": "tea"}))
    wf = spans.one("invoke_workflow notes")
    agent = spans.one("invoke_agent planner")
    assert spans.parent_of(agent) is wf
    a = agent.attributes
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert a["gen_ai.agent.id"] == "agent-7"
    assert a["gen_ai.agent.description"] == "Plans the answer"
    assert a["langgraph.node.name"] == "plan"
    assert a["langgraph.step"] == 1 and isinstance(a["langgraph.step"], int)
    assert a["chatter.llm.calls"] == 1 and a["gen_ai.usage.input_tokens"] == 23
    # the agent's one span stands for the node: no invoke_node for it, nor for the chain in it
    assert [s.name for s in spans.children(wf)] == ["invoke_agent planner", "invoke_node writer"]
    chats = spans.named(f"chat {MODEL}")
    planned = next(c for c in chats if spans.parent_of(c) is agent)
    assert planned.attributes["gen_ai.agent.name"] == "planner"
    assert planned.attributes["gen_ai.agent.id"] == "agent-7"
    written = next(c for c in chats if spans.parent_of(c).name == "invoke_node writer")
    assert "gen_ai.agent.name" not in written.attributes
    # the workflow rolls up both calls, the agent's included, once
    assert wf.attributes["chatter.llm.calls"] == 2
    assert wf.attributes["gen_ai.usage.input_tokens"] == 46
    assert wf.attributes["gen_ai.workflow.name"] == "notes"


def test_graph_marked_by_config_and_agent_as_subgraph(spans: Any, openai_server: Any) -> None:
    def answer(state: Notes) -> Notes:
        return {"text": str(_llm(openai_server).invoke("hi").content)}

    inner = StateGraph(Notes)
    inner.add_node("answer", answer)
    inner.add_edge(START, "answer")
    inner.add_edge("answer", END)
    support = inner.compile(name="support").with_config(
        metadata={"gen_ai.agent.name": "support-desk"}
    )
    support.invoke({"topic": "x"})
    agent = spans.one("invoke_agent support-desk")
    assert agent.parent is None
    # the node inherits the mark (LangChain hands metadata down): still a plain node
    assert [s.name for s in spans.children(agent)] == ["invoke_node answer"]
    assert spans.one(f"chat {MODEL}").attributes["gen_ai.agent.name"] == "support-desk"

    spans.clear()
    openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
    helper = create_agent(_llm(openai_server), [add], name="helper")
    outer = StateGraph(dict)  # type: ignore[type-var]
    outer.add_node("delegate", helper)
    outer.add_edge(START, "delegate")
    outer.add_edge("delegate", END)
    outer.compile(name="front").invoke(_ask())
    wf = spans.one("invoke_workflow front")
    node = spans.one("invoke_node delegate")
    agent = spans.one("invoke_agent helper")
    assert spans.parent_of(node) is wf and spans.parent_of(agent) is node
    _agent_tree(spans, agent, "helper")
    assert wf.attributes["chatter.llm.calls"] == 2
    assert wf.attributes["gen_ai.usage.input_tokens"] == 46
    assert "gen_ai.agent.name" not in wf.attributes


def test_agents_run_concurrently(spans: Any, openai_server: Any) -> None:
    agent = create_agent(_llm(openai_server), [add], name="helper")

    async def main() -> None:
        await asyncio.gather(*(agent.ainvoke(_ask()) for _ in range(8)))

    asyncio.run(main())
    agents = spans.named("invoke_agent helper")
    assert len(agents) == 8
    assert len({s.context.trace_id for s in agents}) == 8
    for a in agents:
        assert a.attributes["chatter.llm.calls"] == 1
        kids = spans.children(a)
        assert [k.name for k in kids] == ["invoke_node model"]
        (chat,) = spans.children(kids[0])
        assert chat.context.trace_id == a.context.trace_id


async def test_agent_run_feeds_the_events(spans: Any, openai_server: Any) -> None:
    from chatter_otel.sinks.events import EventBus, EventSpanProcessor

    bus = EventBus()
    spans.provider.add_span_processor(EventSpanProcessor(bus))
    sub = bus.subscribe()
    openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
    await create_agent(_llm(openai_server), [add], name="helper").ainvoke(_ask())
    events = []
    while not events or events[-1].event_type != "workflow_completed":
        events.append(await asyncio.wait_for(sub.get(), timeout=10))
    started, done = events[0], events[-1]
    assert started.event_type == "workflow_started"
    assert started.metadata["span_name"] == done.metadata["span_name"] == "invoke_agent helper"
    assert started.data == {"workflow_name": "helper"}
    assert done.data["input_tokens"] == 46 and done.data["llm_calls"] == 2
    assert done.data["tool_calls"] == 1
    agent = spans.one("invoke_agent helper")
    assert done.workflow_id == format(agent.context.span_id, "016x")


async def test_an_unsampled_agent_run_is_still_accounted(openai_server: Any) -> None:
    """Accounting is not sampling: with ALWAYS_OFF nothing is exported, yet the agent's run and
    its LLM calls reach the processors (events here) with the exact usage."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from chatter_otel import LangGraphInstrumentor
    from chatter_otel.sinks.events import EventBus, EventSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = EventBus()
    provider.add_span_processor(EventSpanProcessor(bus))
    sub = bus.subscribe()
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=provider)
    try:
        openai_server.tool_calls.append([("add", {"a": 2, "b": 3})])
        await create_agent(_llm(openai_server), [add], name="helper").ainvoke(_ask())
        events = []
        while not events or events[-1].event_type != "workflow_completed":
            events.append(await asyncio.wait_for(sub.get(), timeout=10))
    finally:
        inst.uninstrument()
    assert exporter.get_finished_spans() == ()
    done = events[-1]
    assert done.metadata["span_name"] == "invoke_agent helper"
    assert done.data["input_tokens"] == 46 and done.data["output_tokens"] == 14
    assert done.data["llm_calls"] == 2 and done.data["tool_calls"] == 1
    calls = [e for e in events if e.event_type == "llm_call_completed"]
    assert sum(e.data["input_tokens"] for e in calls) == 46
