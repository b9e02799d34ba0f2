"""Interrupt and resume: the paused run records its checkpoint; the resuming run's workflow span
links to it, with `gen_ai.agent.paused` / `gen_ai.agent.resumed` events."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from opentelemetry.trace import StatusCode

from chatter_otel import last_run

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan


class Count(TypedDict, total=False):
    n: int


def _graph(name: str = "hitl", *, async_node: bool = False) -> Any:
    def ask(state: Count) -> Count:
        return {"n": int(interrupt("how many?"))}

    async def aask(state: Count) -> Count:
        await asyncio.sleep(0)
        return {"n": int(interrupt("how many?"))}

    g = StateGraph(Count)
    g.add_node("ask", aask if async_node else ask)
    g.add_edge(START, "ask")
    g.add_edge("ask", END)
    return g.compile(name=name, checkpointer=InMemorySaver())


def _event(span: ReadableSpan, name: str) -> dict[str, Any]:
    found = [e for e in span.events if e.name == name]
    assert len(found) == 1, [e.name for e in span.events]
    return dict(found[0].attributes or {})


def _paused_at(graph: Any, cfg: dict[str, Any]) -> str:
    """The checkpoint the thread is paused at (read before the resume moves it on)."""
    return str(graph.get_state(cfg).config["configurable"]["checkpoint_id"])


def _check_pair(
    spans: Any, checkpoint: str, cfg: dict[str, Any], interrupt_id: str, name: str = "hitl"
) -> tuple[ReadableSpan, ReadableSpan]:
    paused, resumed = spans.named(f"invoke_workflow {name}")
    thread = cfg["configurable"]["thread_id"]
    # the paused run: not an error, marked, with the pause event
    assert paused.status.status_code is StatusCode.UNSET
    assert paused.attributes["chatter.interrupted"] is True
    expected = {
        "langgraph.thread.id": thread,
        "langgraph.checkpoint.id": checkpoint,
        "langgraph.interrupt.ids": (interrupt_id,),
    }
    assert _event(paused, "gen_ai.agent.paused") == expected
    assert {k: paused.attributes[k] for k in expected} == expected
    # the resumed run: another trace, linked to the paused span, with the resume event
    assert resumed.context.trace_id != paused.context.trace_id
    assert len(resumed.links) == 1
    link = resumed.links[0]
    assert link.context.trace_id == paused.context.trace_id
    assert link.context.span_id == paused.context.span_id
    assert dict(link.attributes or {}) == expected
    assert _event(resumed, "gen_ai.agent.resumed") == expected
    assert resumed.attributes["langgraph.thread.id"] == thread
    assert resumed.attributes["langgraph.checkpoint.id"] == checkpoint
    assert "chatter.interrupted" not in resumed.attributes
    assert [e.name for e in resumed.events] == ["gen_ai.agent.resumed"]
    return paused, resumed


def test_interrupt_then_resume_sync(spans: Any) -> None:
    graph = _graph()
    cfg = {"configurable": {"thread_id": "hitl-1"}}
    first = graph.invoke({"n": 0}, cfg)
    checkpoint = _paused_at(graph, cfg)
    run = last_run()
    assert run is not None and run.status == "interrupted"
    assert run.record is not None and run.record.status == "interrupted"
    assert graph.invoke(Command(resume="5"), cfg) == {"n": 5}
    assert last_run().status == "ok"  # type: ignore[union-attr]
    _check_pair(spans, checkpoint, cfg, first["__interrupt__"][0].id)


def test_interrupt_then_resume_async_and_streamed(spans: Any) -> None:
    graph = _graph(async_node=True)
    cfg = {"configurable": {"thread_id": "hitl-2"}}

    async def main() -> tuple[str, list[Any]]:
        chunks = [c async for c in graph.astream({"n": 0}, cfg)]
        (pending,) = chunks[-1]["__interrupt__"]
        at = (await graph.aget_state(cfg)).config["configurable"]["checkpoint_id"]
        resumed = [c async for c in graph.astream(Command(resume="7"), cfg)]
        return pending.id, at, resumed

    interrupt_id, checkpoint, resumed = asyncio.run(main())
    assert resumed[-1] == {"ask": {"n": 7}}
    _check_pair(spans, checkpoint, cfg, interrupt_id)


def test_interrupt_in_a_subgraph_pauses_the_outer_run(spans: Any) -> None:
    inner = _graph("inner")
    outer = StateGraph(Count)
    outer.add_node("review", inner)
    outer.add_edge(START, "review")
    outer.add_edge("review", END)
    graph = outer.compile(name="outer", checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "hitl-3"}}
    first = graph.invoke({"n": 0}, cfg)
    checkpoint = _paused_at(graph, cfg)
    graph.invoke(Command(resume="2"), cfg)
    _check_pair(spans, checkpoint, cfg, first["__interrupt__"][0].id, "outer")
    # the subgraph's own run is marked too, but only the app's call records the pause
    inner_paused = spans.named("invoke_workflow inner")[0]
    assert inner_paused.attributes["chatter.interrupted"] is True
    assert [e.name for e in inner_paused.events] == []


def test_resume_of_a_pause_this_process_never_saw(instrument: Any) -> None:
    """Paused in one process (here: an earlier instrumentation, whose pause registry is gone),
    resumed in another: linked through the checkpoint the paused run wrote (the two-process
    version is tests/test_cross_process_pauses.py)."""
    graph = _graph()
    cfg = {"configurable": {"thread_id": "hitl-4"}}
    spans = instrument()
    graph.invoke({"n": 0}, cfg)
    paused = spans.one("invoke_workflow hitl")
    from chatter_otel import LangGraphInstrumentor

    LangGraphInstrumentor().uninstrument()
    spans = instrument()
    graph.invoke(Command(resume="1"), cfg)
    resumed = spans.one("invoke_workflow hitl")
    (link,) = resumed.links
    assert link.context.span_id == paused.context.span_id
    assert link.context.trace_id == paused.context.trace_id
    checkpoint = paused.attributes["langgraph.checkpoint.id"]
    assert dict(link.attributes or {}) == {"langgraph.thread.id": "hitl-4",
                                           "langgraph.checkpoint.id": checkpoint}  # fmt: skip
    assert _event(resumed, "gen_ai.agent.resumed") == {"langgraph.thread.id": "hitl-4"}


def test_pauses_are_bounded_and_keyed_by_thread_and_checkpoint(instrument: Any) -> None:
    spans = instrument(max_runs=16)
    from chatter_otel import LangGraphInstrumentor

    handler = LangGraphInstrumentor().handler
    graph = _graph()
    for i in range(20):
        graph.invoke({"n": 0}, {"configurable": {"thread_id": f"t-{i}"}})
    assert len(handler.pauses) == 16
    assert len(handler.threads) == 0  # the runs open by thread: none once they ended
    spans.clear()
    graph.invoke(Command(resume="1"), {"configurable": {"thread_id": "t-0"}})  # dropped first
    # no longer in the registry: linked through its checkpoint instead, once it is loaded
    (link,) = spans.one("invoke_workflow hitl").links
    assert dict(link.attributes or {})["langgraph.thread.id"] == "t-0"
    spans.clear()
    graph.invoke(Command(resume="1"), {"configurable": {"thread_id": "t-19"}})
    assert len(spans.one("invoke_workflow hitl").links) == 1
    # a resume from an explicit checkpoint links only to a pause at that checkpoint
    spans.clear()
    cfg = {"configurable": {"thread_id": "t-18", "checkpoint_id": "1f0-not-the-one"}}
    graph.invoke(Command(resume="1"), cfg)
    assert spans.starting("invoke_workflow hitl")[0].links == ()
    spans.clear()
    at = _paused_at(graph, {"configurable": {"thread_id": "t-17"}})
    graph.invoke(Command(resume="1"), {"configurable": {"thread_id": "t-17", "checkpoint_id": at}})
    (link,) = spans.one("invoke_workflow hitl").links
    assert dict(link.attributes or {})["langgraph.checkpoint.id"] == at


def test_no_pause_no_link(spans: Any) -> None:
    def plain(state: Count) -> Count:
        return {"n": 1}

    g = StateGraph(Count)
    g.add_node("plain", plain)
    g.add_edge(START, "plain")
    g.add_edge("plain", END)
    g.compile(name="plain", checkpointer=InMemorySaver()).invoke(
        {"n": 0}, {"configurable": {"thread_id": "p-1"}}
    )
    s = spans.one("invoke_workflow plain")
    assert s.links == () and s.events == ()
    assert "chatter.interrupted" not in s.attributes
    assert last_run().status == "ok"  # type: ignore[union-attr]

    # new input on a paused thread starts over: not a resume, so no link and no resume event
    graph = _graph()
    cfg = {"configurable": {"thread_id": "p-2"}}
    graph.invoke({"n": 0}, cfg)
    spans.clear()
    graph.invoke({"n": 0}, cfg)
    s = spans.one("invoke_workflow hitl")
    assert s.links == ()
    assert [e.name for e in s.events] == ["gen_ai.agent.paused"]


def _two_steps(name: str, **breakpoints: Any) -> Any:
    """first (n = 1) then second (n + 1), checkpointed; ``breakpoints`` compiled in."""

    def first(state: Count) -> Count:
        return {"n": 1}

    def second(state: Count) -> Count:
        return {"n": state["n"] + 1}

    g = StateGraph(Count)
    g.add_node("first", first)
    g.add_node("second", second)
    g.add_edge(START, "first")
    g.add_edge("first", "second")
    g.add_edge("second", END)
    return g.compile(name=name, checkpointer=InMemorySaver(), **breakpoints)


@pytest.mark.parametrize("where", ["interrupt_before", "interrupt_after"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_static_breakpoint_is_a_pause_and_going_on_links_to_it(
    spans: Any, where: str, mode: str
) -> None:
    """``interrupt_before``/``interrupt_after`` pause a graph with no exception anywhere:
    LangGraph's ``on_interrupt`` says so. The paused run is marked and records the pause; the
    run that goes on (input ``None``) links to it, as a ``Command(resume=...)`` does."""

    graph = _two_steps("review", **{where: ["second"]})
    cfg: Any = {"configurable": {"thread_id": f"static-{where}-{mode}"}}
    if mode == "sync":
        graph.invoke({"n": 0}, cfg)
        paused_run = last_run()
        checkpoint = _paused_at(graph, cfg)
        assert graph.invoke(None, cfg)["n"] == 2
    else:

        async def main() -> tuple[Any, str]:
            await graph.ainvoke({"n": 0}, cfg)
            run = last_run()
            at = (await graph.aget_state(cfg)).config["configurable"]["checkpoint_id"]
            await graph.ainvoke(None, cfg)
            return run, at

        paused_run, checkpoint = asyncio.run(main())
    assert paused_run is not None and paused_run.status == "interrupted"
    paused, resumed = spans.named("invoke_workflow review")
    thread = cfg["configurable"]["thread_id"]
    expected = {"langgraph.thread.id": thread, "langgraph.checkpoint.id": checkpoint}
    assert paused.attributes["chatter.interrupted"] is True
    assert paused.status.status_code is StatusCode.UNSET
    assert _event(paused, "gen_ai.agent.paused") == expected
    (link,) = resumed.links
    assert link.context.span_id == paused.context.span_id
    assert dict(link.attributes or {}) == expected
    assert _event(resumed, "gen_ai.agent.resumed") == expected
    assert "chatter.interrupted" not in resumed.attributes
    assert last_run().status == "ok"  # type: ignore[union-attr]


def test_a_breakpoint_given_at_the_call_is_a_pause_too(spans: Any) -> None:
    graph = _two_steps("called")  # no breakpoint compiled in
    cfg: Any = {"configurable": {"thread_id": "static-call"}}
    graph.invoke({"n": 0}, cfg, interrupt_before=["second"])
    assert last_run().status == "interrupted"  # type: ignore[union-attr]
    graph.invoke(None, cfg)
    paused, resumed = spans.named("invoke_workflow called")
    assert paused.attributes["chatter.interrupted"] is True
    assert resumed.links[0].context.span_id == paused.context.span_id
