"""One app worker of the cross-process pause tests, run as a subprocess:
``python -m tests._pause_worker MODE CHECKPOINTS_DB THREAD OUT_JSON``.

A two-step graph (``ask``, then ``send``) on a SQLite checkpointer file every worker shares.
MODE: ``interrupt`` (``ask`` calls ``interrupt()``), ``breakpoint`` (compiled with
``interrupt_before=["send"]``), ``resume`` (``Command(resume="yes")``), ``aresume`` (the same
with ``ainvoke`` on the async saver), ``continue`` (``None``: go on from a breakpoint), ``new``
(a new message on the thread), ``forged`` (an uninstrumented run whose config metadata carries a
bogus stamp). The spans this process recorded go to OUT_JSON.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from typing import Any, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import LangGraphInstrumentor


class State(TypedDict):
    text: str


def build(checkpointer: Any, *, ask_human: bool, breakpoint_: bool) -> Any:
    def ask(state: State) -> State:
        if ask_human:
            return {"text": f"{state['text']} ({interrupt('send it?')})"}
        return {"text": state["text"]}

    def send(state: State) -> State:
        return {"text": state["text"] + " sent"}

    g = StateGraph(State)
    g.add_node("ask", ask)
    g.add_node("send", send)
    g.add_edge(START, "ask")
    g.add_edge("ask", "send")
    g.add_edge("send", END)
    return g.compile(checkpointer=checkpointer, name="approve",
                     interrupt_before=["send"] if breakpoint_ else None)  # fmt: skip


def dump(exporter: InMemorySpanExporter) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "attributes": dict(s.attributes or {}),
            "events": [e.name for e in s.events],
            "links": [
                {
                    "trace_id": format(link.context.trace_id, "032x"),
                    "span_id": format(link.context.span_id, "016x"),
                    "attributes": dict(link.attributes or {}),
                }
                for link in s.links
            ],
        }
        for s in exporter.get_finished_spans()
    ]


def main(mode: str, db: str, thread: str, out: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = LangGraphInstrumentor()
    if mode != "forged":
        inst.instrument(tracer_provider=provider)
    config: dict[str, Any] = {"configurable": {"thread_id": thread}}
    ask_human = mode in ("interrupt", "resume", "aresume")
    breakpoint_ = mode in ("breakpoint", "continue", "new", "forged")
    if mode == "aresume":
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        async def resume() -> None:
            async with AsyncSqliteSaver.from_conn_string(db) as saver:
                graph = build(saver, ask_human=True, breakpoint_=False)
                await graph.ainvoke(Command(resume="yes"), config)

        asyncio.run(resume())
    else:
        saver = SqliteSaver(sqlite3.connect(db, check_same_thread=False))
        graph = build(saver, ask_human=ask_human, breakpoint_=breakpoint_)
        inputs: Any = {
            "interrupt": {"text": "draft"}, "breakpoint": {"text": "draft"},
            "resume": Command(resume="yes"), "continue": None, "new": {"text": "again"},
            "forged": {"text": "draft"},
        }[mode]  # fmt: skip
        if mode == "forged":
            config["metadata"] = {"chatter.run.traceparent": "00-<script>-x-01"}
        graph.invoke(inputs, config)
    with open(out, "w") as fh:
        json.dump(dump(exporter), fh)


if __name__ == "__main__":
    main(*sys.argv[1:5])
