"""Errors are recorded and pass through unchanged; LangGraph control flow is not an error."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt
from opentelemetry.trace import StatusCode

from chatter_otel import last_run
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LocalChatModel


class Count(TypedDict):
    n: int


class Msgs(TypedDict):
    messages: list


class AppError(RuntimeError):
    pass


def _one_node(fn: Any, name: str = "g") -> Any:
    g = StateGraph(Count)
    g.add_node("step", fn)
    g.add_edge(START, "step")
    g.add_edge("step", END)
    return g.compile(name=name)


def test_node_error_is_recorded_and_the_same_exception_reaches_the_app(spans: Any) -> None:
    boom = AppError("db unavailable")

    def step(state: Count) -> Count:
        raise boom

    with pytest.raises(AppError) as caught:
        _one_node(step).invoke({"n": 1})
    assert caught.value is boom  # not rewrapped, not replaced
    node, wf = spans.one("invoke_node step"), spans.one("invoke_workflow g")
    for s in (node, wf):
        assert s.status.status_code is StatusCode.ERROR
        assert s.attributes["error.type"] == f"{__name__}.AppError"
        # content capture is off: the class, never the app's message text
        assert s.status.description == f"{__name__}.AppError"
    # one exception event: on the span where it surfaced, not again on every ancestor
    assert [e.name for e in node.events] == ["exception"]
    assert dict(node.events[0].attributes) == {"exception.type": f"{__name__}.AppError"}
    assert [e.name for e in wf.events] == []
    run = last_run()
    assert run is not None and run.status == "error"
    assert run.error_type == f"{__name__}.AppError"


async def test_async_node_error(spans: Any) -> None:
    async def step(state: Count) -> Count:
        raise AppError("async boom")

    with pytest.raises(AppError, match="async boom"):
        await _one_node(step).ainvoke({"n": 1})
    assert spans.one("invoke_workflow g").attributes["error.type"].endswith("AppError")


def test_llm_error_marks_chat_span(spans: Any) -> None:
    class Failing(LocalChatModel):
        def _generate(self, *a: Any, **k: Any) -> Any:
            raise ConnectionError("upstream reset")

    def step(state: Count) -> Count:
        Failing().invoke("hi")
        return state

    with pytest.raises(ConnectionError):
        _one_node(step).invoke({"n": 1})
    chat = spans.one("chat chatter-local-1")
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes["error.type"] == "ConnectionError"
    # no usage invented for a call that failed
    assert "gen_ai.usage.input_tokens" not in chat.attributes
    assert chat.attributes["chatter.usage.missing"] is True
    wf = spans.one("invoke_workflow g")
    assert wf.attributes["chatter.llm.calls"] == 1
    assert "gen_ai.usage.input_tokens" not in wf.attributes
    assert [e.name for e in chat.events] == ["exception"]
    assert [e.name for e in spans.one("invoke_node step").events] == []


def test_tool_error_handled_by_toolnode(spans: Any) -> None:
    @tool
    def flaky(x: int) -> int:
        """Fails."""
        raise ValueError("bad x")

    g = StateGraph(Msgs)
    g.add_node("tools", ToolNode([flaky], handle_tool_errors=True))
    g.add_edge(START, "tools")
    g.add_edge("tools", END)
    call = {"name": "flaky", "args": {"x": 1}, "id": "call_1"}
    out = g.compile(name="t").invoke({"messages": [AIMessage("", tool_calls=[call])]})
    assert "bad x" in out["messages"][-1].content  # the app's behaviour: error as a message
    t = spans.one("execute_tool flaky")
    assert t.status.status_code is StatusCode.ERROR
    assert t.attributes["error.type"] == "ValueError"
    # the graph itself succeeded
    assert spans.one("invoke_workflow t").status.status_code is StatusCode.UNSET
    assert spans.one("invoke_workflow t").attributes["chatter.tool.calls"] == 1


def test_interrupt_is_not_an_error_and_resume_works(spans: Any) -> None:
    def ask(state: Count) -> Count:
        answer = interrupt("how many?")
        return {"n": int(answer)}

    g = StateGraph(Count)
    g.add_node("ask", ask)
    g.add_edge(START, "ask")
    g.add_edge("ask", END)
    graph = g.compile(name="hitl", checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "hitl-1"}}
    first = graph.invoke({"n": 0}, cfg)
    assert "__interrupt__" in first
    assert graph.invoke(Command(resume="5"), cfg) == {"n": 5}
    wfs = spans.named("invoke_workflow hitl")
    assert len(wfs) == 2
    for s in spans.all:
        assert s.status.status_code is not StatusCode.ERROR, s.name
        assert "error.type" not in s.attributes
    asks = spans.named("invoke_node ask")
    assert asks[0].attributes["chatter.interrupted"] is True
    assert "chatter.interrupted" not in asks[1].attributes
    assert all(s.attributes["gen_ai.conversation.id"] == "hitl-1" for s in spans.all)


def test_command_goto_and_parent_command(spans: Any) -> None:
    def child_step(state: Count) -> Command:
        return Command(graph=Command.PARENT, goto="after", update={"n": state["n"] + 10})

    sub = StateGraph(Count)
    sub.add_node("child_step", child_step)
    sub.add_edge(START, "child_step")
    inner = sub.compile(name="inner")

    def router(state: Count) -> Command:
        return Command(goto="inner", update={"n": state["n"] + 1})

    def after(state: Count) -> Count:
        return {"n": state["n"] * 2}

    g = StateGraph(Count)
    g.add_node("router", router)
    g.add_node("inner", inner)
    g.add_node("after", after)
    g.add_edge(START, "router")
    g.add_edge("after", END)
    assert g.compile(name="outer").invoke({"n": 1}) == {"n": 24}
    for s in spans.all:
        assert s.status.status_code is not StatusCode.ERROR, s.name
    assert spans.one("invoke_node after")


def test_stream_closed_early_by_the_consumer(spans: Any) -> None:
    stream = build_chat_graph().stream({"messages": [HumanMessage("weather in Oslo")]})
    first = next(stream)
    assert "agent" in first
    stream.close()
    wf = spans.one("invoke_workflow chat")
    assert wf.end_time is not None
    assert wf.attributes["chatter.cancelled"] is True
    assert wf.status.status_code is StatusCode.UNSET
    assert wf.attributes["chatter.llm.calls"] == 1


def test_model_stream_consumer_stops_early(spans: Any) -> None:
    model = LocalChatModel()
    gen = model.stream("one two three four five six")
    assert next(gen).content == "You"
    gen.close()
    chat = spans.one("chat chatter-local-1")
    assert chat.end_time is not None
    assert chat.attributes["chatter.cancelled"] is True
    assert chat.attributes["gen_ai.request.stream"] is True
    assert chat.status.status_code is StatusCode.UNSET


async def test_async_run_cancelled(spans: Any) -> None:
    started = asyncio.Event()

    async def slow(state: Count) -> Count:
        started.set()
        await asyncio.sleep(30)
        return state

    task = asyncio.create_task(_one_node(slow, "slow").ainvoke({"n": 1}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    wf = spans.one("invoke_workflow slow")
    assert wf.attributes["chatter.cancelled"] is True
    assert wf.status.status_code is StatusCode.UNSET
    node = spans.one("invoke_node step")
    assert node.end_time is not None
    assert node.attributes["chatter.cancelled"] is True


def test_streamed_model_failing_mid_stream(spans: Any) -> None:
    class Breaks(LocalChatModel):
        def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any):
            for i, chunk in enumerate(super()._stream(messages, stop, run_manager, **kw)):
                if i == 2:
                    raise TimeoutError("stream stalled")
                yield chunk

    with pytest.raises(TimeoutError):
        list(Breaks().stream("a b c d e f"))
    chat = spans.one("chat chatter-local-1")
    assert chat.attributes["error.type"] == "TimeoutError"
    assert chat.attributes["gen_ai.request.stream"] is True
    assert chat.attributes["chatter.usage.missing"] is True


def test_error_inside_graph_with_messages(spans: Any) -> None:
    def bad(state: Msgs) -> Msgs:
        raise KeyError("missing")

    g = StateGraph(Msgs)
    g.add_node("bad", bad)
    g.add_edge(START, "bad")
    g.add_edge("bad", END)
    with pytest.raises(KeyError):
        g.compile(name="k").invoke({"messages": [HumanMessage("x")]})
    assert spans.one("invoke_workflow k").attributes["error.type"] == "KeyError"


SECRET = "the user's prompt: my card is 4111 1111 1111 1111"


def _fail_with_secret(state: Count) -> Count:
    raise AppError(SECRET)


def test_exception_text_never_leaves_with_capture_off(instrument: Any) -> None:
    """A model or tool that raises with prompt text in its message: with capture off nothing of
    that text is on any span (status, events, attributes), failing span or ancestor."""
    spans = instrument()
    with pytest.raises(AppError):
        _one_node(_fail_with_secret).invoke({"n": 1})
    for s in spans.all:
        dumped = repr((s.status.description, dict(s.attributes or {}),
                       [(e.name, dict(e.attributes or {})) for e in s.events]))  # fmt: skip
        assert "4111" not in dumped and "prompt" not in dumped, dumped


def test_exception_text_opt_in_keeps_message_and_stack_trace(instrument: Any) -> None:
    spans = instrument(capture_exception_text=True)
    with pytest.raises(AppError):
        _one_node(_fail_with_secret).invoke({"n": 1})
    node = spans.one("invoke_node step")
    assert SECRET in node.status.description
    (event,) = node.events
    assert event.attributes["exception.message"] == SECRET
    assert "Traceback" in event.attributes["exception.stacktrace"]


def test_exception_text_goes_through_the_redaction_hook(instrument: Any) -> None:
    seen: list[str] = []

    def redact(kind: str, value: Any) -> Any:
        seen.append(kind)
        return "[redacted]" if kind == "exception" else value

    spans = instrument(capture_content=True, redact=redact)  # exception text follows content
    with pytest.raises(AppError):
        _one_node(_fail_with_secret).invoke({"n": 1})
    node, wf = spans.one("invoke_node step"), spans.one("invoke_workflow g")
    assert "exception" in seen
    for s in (node, wf):
        assert s.status.description == f"{__name__}.AppError: [redacted]"
    (event,) = node.events
    assert dict(event.attributes) == {
        "exception.type": f"{__name__}.AppError",
        "exception.message": "[redacted]",
    }


def test_exception_text_off_by_environment(
    instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    monkeypatch.setenv("CHATTER_OTEL_CAPTURE_EXCEPTION_TEXT", "false")
    spans = instrument()
    with pytest.raises(AppError):
        _one_node(_fail_with_secret).invoke({"n": 1})
    assert spans.one("invoke_node step").status.description == f"{__name__}.AppError"
