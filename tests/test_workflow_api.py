"""``track_workflow`` and ``last_run``: the app's ids in, the usage and trace id out."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.trace import StatusCode

from chatter_otel import WorkflowRun, last_run, track_workflow
from chatter_otel.reference.demo import build_chat_graph

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
IDS = {
    "conversation_id": "conv-1",
    "message_id": "01J0000000000000000000MSG1",
    "user_id": "user-1",
    "correlation_id": "corr-1",
}


def _check(run: WorkflowRun, spans: Any) -> None:
    wf = spans.one("invoke_workflow chat-turn")
    graph = spans.one("invoke_workflow chat")
    assert spans.parent_of(graph) is wf
    assert run.trace_id == format(wf.context.trace_id, "032x")
    assert len(run.trace_id) == 32
    assert run.workflow_id == format(wf.context.span_id, "016x")
    assert wf.attributes["chatter.workflow.id"] == run.workflow_id
    assert run.status == "ok"
    u = run.usage
    chats = spans.named("chat chatter-local-1")
    assert u.prompt_tokens == sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats)
    assert u.completion_tokens == sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert isinstance(u.cost, Decimal)
    # 0.50 / 1.50 USD per million tokens (the demo's override-table entry)
    assert u.cost == (Decimal("0.5") * u.prompt_tokens + Decimal("1.5") * u.completion_tokens) / (
        10**6
    )
    assert u.provider == "chatter.local" and u.model == "chatter-local-1"
    assert u.llm_calls == 2 and u.tool_calls == 1
    assert isinstance(u.response_time_ms, int)
    for key in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "chatter.llm.calls"):
        assert wf.attributes[key] == graph.attributes[key]
    for s in spans.all:
        assert s.attributes["gen_ai.conversation.id"] == "conv-1", s.name
        assert s.attributes["chatter.message.id"] == IDS["message_id"], s.name
        assert s.attributes["user.id"] == "user-1", s.name
        assert s.attributes["chatter.correlation.id"] == "corr-1", s.name
    assert last_run() is run


def test_sync(spans: Any) -> None:
    with track_workflow("chat-turn", **IDS) as run:
        assert run.status == "running"
        build_chat_graph().invoke(Q)
    _check(run, spans)


async def test_async(spans: Any) -> None:
    async with track_workflow("chat-turn", **IDS) as run:
        await build_chat_graph().ainvoke(Q)
    _check(run, spans)


async def test_async_streaming(spans: Any) -> None:
    async with track_workflow("chat-turn", **IDS) as run:
        async for _ in build_chat_graph().astream(Q, stream_mode="messages"):
            pass
    _check(run, spans)


def test_exception_passes_unchanged(spans: Any) -> None:
    err = LookupError("nope")
    with pytest.raises(LookupError) as caught, track_workflow("chat-turn", **IDS) as run:
        build_chat_graph().invoke(Q)
        raise err
    assert caught.value is err
    assert run.status == "error" and run.error_type == "LookupError"
    wf = spans.one("invoke_workflow chat-turn")
    assert wf.status.status_code is StatusCode.ERROR
    assert wf.attributes["error.type"] == "LookupError"
    # usage of what did run is still reported
    assert run.usage.llm_calls == 2


def test_nested_workflows_roll_up(spans: Any) -> None:
    graph = build_chat_graph()
    with track_workflow("outer", conversation_id="c") as outer:
        with track_workflow("inner") as inner:
            graph.invoke(Q)
        graph.invoke(Q)
    assert inner.usage.llm_calls == 2
    assert outer.usage.llm_calls == 4
    assert outer.usage.total_tokens == 2 * inner.usage.total_tokens
    assert inner.conversation_id == "c"  # ids inherited from the enclosing workflow
    assert last_run() is outer
    assert spans.parent_of(spans.one("invoke_workflow inner")) is spans.one("invoke_workflow outer")


async def test_last_run_is_per_task(spans: Any) -> None:
    graph = build_chat_graph()

    async def turn(city: str) -> tuple[str, WorkflowRun | None]:
        await graph.ainvoke({"messages": [HumanMessage(f"weather in {city}")]},
                            {"configurable": {"thread_id": city}})  # fmt: skip
        return city, last_run()

    results = await asyncio.gather(*(turn(c) for c in ("Oslo", "Tokyo", "Lima")))
    for city, run in results:
        assert run is not None and run.conversation_id == city


def test_without_instrumentation_it_still_works() -> None:
    with track_workflow("bare") as run:
        pass
    assert run.status == "ok"
    assert run.usage.llm_calls == 0 and run.usage.total_tokens is None


def test_hostile_ids_are_dropped(spans: Any) -> None:
    with track_workflow("chat-turn", conversation_id="x" * 10_000, user_id="") as run:
        pass
    assert run.conversation_id is None and run.user_id is None
    wf = spans.one("invoke_workflow chat-turn")
    assert "gen_ai.conversation.id" not in wf.attributes
