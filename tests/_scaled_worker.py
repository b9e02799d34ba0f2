"""One app worker process of the many-workers, many-collectors proof (tests/test_scaled.py):
``python -m tests._scaled_worker SPEC_JSON``.

The spec names the worker, its agent (OTLP/gRPC), the ledger's database, the checkpointer file
every worker shares, its local trace store (the ground truth a test compares Jaeger with) and
what to run: ``ok`` chats, ``err`` chats the app fails after the graph, ``pause`` approval runs
paused by ``interrupt()`` on threads of its own, and ``resume`` threads other workers paused.
Prints one JSON line per run as it ends (so a test can time faults between runs) and writes
the ledger's rows before it exits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command
from opentelemetry import context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chatter_otel import configure, last_run, track_workflow
from chatter_otel.persistence import UsagePersistence
from chatter_otel.reference.agent_demo import build_approval_graph
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES


class Boom(Exception):
    """The app failing after the graph ran (an error trace)."""


def say(kind: str, key: str, run: Any) -> None:
    print(json.dumps({"kind": kind, "key": key, "trace_id": run.trace_id,
                      "span_id": run.workflow_id, "at": time.time()}), flush=True)  # fmt: skip


def main(spec: dict[str, Any]) -> None:
    os.environ.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": spec["agent"], "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "scaled-app",
    })  # fmt: skip
    w = spec["worker"]
    persistence = (UsagePersistence(spec["ledger"], spool_path=spec["spool"], grace_s=0)
                   if spec.get("ledger") else None)  # fmt: skip
    tel = configure(exporter="otlp,local", trace_store=spec["store"], set_global=False,
                    persistence=persistence, prices=LOCAL_MODEL_PRICES)  # fmt: skip
    chat = build_chat_graph()
    saver = SqliteSaver(sqlite3.connect(spec["checkpoints"], check_same_thread=False,
                                        timeout=30))  # fmt: skip
    approval = build_approval_graph(saver)
    pace = spec.get("pace_s", 0.0)
    try:
        for k in range(spec.get("ok", 0)):
            with track_workflow("turn", conversation_id=f"conv-{w}-{k % 5}",
                                correlation_id=f"w{w}-ok-{k}") as run:  # fmt: skip
                chat.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
            say("ok", run.correlation_id, run)
            time.sleep(pace)
            every = spec.get("err_every", 0)
            if every and k % every == every - 1:
                try:
                    with track_workflow("turn", conversation_id=f"conv-{w}-err",
                                        correlation_id=f"w{w}-err-{k}") as run:  # fmt: skip
                        chat.invoke({"messages": [HumanMessage("weather in Lima?")]})
                        raise Boom
                except Boom:
                    say("err", run.correlation_id, run)
        for thread in spec.get("pause", []):
            approval.invoke({"question": "Refund?"}, {"configurable": {"thread_id": thread}})
            say("paused", thread, last_run())
        for thread in spec.get("resume", []):
            approval.invoke(Command(resume="yes"), {"configurable": {"thread_id": thread}})
            say("resumed", thread, last_run())
        if spec.get("remote"):  # a downstream service: each stdin line is a caller's traceparent
            for line in sys.stdin:
                remote(chat, line.strip())
    finally:
        if persistence is not None:
            assert persistence.flush(60), persistence.stats
        assert tel.force_flush()
        tel.shutdown()


def remote(chat: Any, traceparent: str) -> None:
    """One request from another service: an error chat under the caller's span (a trace that
    two processes, on two agents, write)."""
    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    token = context.attach(ctx)
    try:
        with track_workflow("turn", correlation_id=f"remote-{traceparent[3:35]}") as run:
            chat.invoke({"messages": [HumanMessage("weather in Oslo?")]})
            raise Boom
    except Boom:
        say("remote", traceparent, run)
    finally:
        context.detach(token)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
