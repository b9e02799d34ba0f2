"""Against the peers, in instructions per run: chatter-otel, OpenLLMetry, the official util-genai
based LangChain instrumentation, OpenInference, a no-op LangChain callback handler, and the
floor of this span tree (``spans-only``: a handler that opens and closes the same 7 spans, with
as many attributes as ours, parented by run id, through the SDK, and does nothing else), and
the spans alone (``sdk-spans``: the same 7 spans made straight on the SDK beside a bare run, no
callback at all: what any design that records this span tree through the SDK pays).

One workload for all (the reference run: a LangGraph graph, 2 LLM calls and 1 tool call on the
local model), one harness, one process run: each configuration in its own process under
``valgrind --tool=callgrind`` (instruction counts are repeatable on this noisy machine, wall time
is not), twice, with ``--short`` and ``--short + --runs`` runs; the difference divided by
``--runs`` is the instructions per run, imports and start-up cancelled out. Content capture off
everywhere; spans through a ``BatchSpanProcessor`` to an exporter that drops them; every trace
sampled unless the row says unsampled.

The peers live in a venv of the benchmark's own (``build/bench-peers``, made on first use with
the project's pinned LangChain and LangGraph): the official instrumentation needs a newer
``opentelemetry-util-genai`` than the development venv pins for openai-v2.

    python -m benchmarks.bench_peers [--runs N] [--jobs J] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "build" / "bench-peers"
PEERS = ["opentelemetry-instrumentation-langchain==0.62.4",  # OpenLLMetry
         "opentelemetry-instrumentation-genai-langchain==1.3b0",  # the official one (util-genai)
         "openinference-instrumentation-langchain==0.1.80"]  # fmt: skip

WORKLOAD = r"""
import asyncio, os, sys
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

class Drop(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS

class Noop(BaseCallbackHandler):
    run_inline = True

class SpansOnly(BaseCallbackHandler):
    # The same 7 spans with as many attributes as ours (11 workflow, 2 per node, 14 per chat,
    # 5 for the tool), parented by run id, and nothing else: the floor of this span tree.
    run_inline = True

    def __init__(self, tracer):
        self.tracer, self.spans, self.graph = tracer, {}, None

    def _start(self, run_id, parent_run_id, name, n):
        parent = self.spans.get(parent_run_id)
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        attrs = {f"gen_ai.attribute_{i}": "value" for i in range(n)}
        self.spans[run_id] = self.tracer.start_span(name, context=ctx, attributes=attrs)

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, metadata=None,
                       **kw):
        if parent_run_id is None:
            self.graph = run_id
            self._start(run_id, None, "invoke_workflow chat", 11)
        elif parent_run_id == self.graph and "langgraph_node" in (metadata or {}) and (
                metadata["langgraph_node"] != "__start__"):
            self._start(run_id, parent_run_id, "invoke_node " + metadata["langgraph_node"], 2)
        elif parent_run_id in self.spans:
            self.spans[run_id] = self.spans[parent_run_id]

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, "chat model", 7)

    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, "execute_tool get_weather", 5)

    def _end(self, run_id, n=0):
        span = self.spans.pop(run_id, None)
        if span is not None and span.is_recording() and not span._end_time:
            if n:
                span.set_attributes({f"gen_ai.end_{i}": 1 for i in range(n)})
            span.end()

    def on_chain_end(self, outputs, *, run_id, **kw):
        self._end(run_id)

    def on_llm_end(self, response, *, run_id, **kw):
        self._end(run_id, 7)

    def on_tool_end(self, output, *, run_id, **kw):
        self._end(run_id)

who, call, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
provider = TracerProvider(sampler=ALWAYS_OFF if who.endswith("unsampled") else ALWAYS_ON)
provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
config = {}
if who.startswith("chatter-otel"):
    from chatter_otel import LangGraphInstrumentor
    LangGraphInstrumentor().instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
elif who == "openllmetry":
    os.environ["TRACELOOP_TRACE_CONTENT"] = "false"
    from opentelemetry.instrumentation.langchain import LangchainInstrumentor
    LangchainInstrumentor().instrument(tracer_provider=provider)
elif who == "official":
    from opentelemetry.instrumentation.genai.langchain import LangChainInstrumentor
    LangChainInstrumentor().instrument(tracer_provider=provider)
elif who == "openinference":
    from openinference.instrumentation import TraceConfig
    from openinference.instrumentation.langchain import LangChainInstrumentor
    hide = TraceConfig(hide_inputs=True, hide_outputs=True, hide_input_messages=True,
                       hide_output_messages=True)
    LangChainInstrumentor().instrument(tracer_provider=provider, config=hide)
elif who == "noop-handler":
    config = {"callbacks": [Noop()]}
elif who == "spans-only":
    config = {"callbacks": [SpansOnly(provider.get_tracer("floor"))]}
graph = build_chat_graph()
question = {"messages": [HumanMessage("What is the weather in Paris?")]}
sdk = provider.get_tracer("sdk-floor")

def sdk_spans():
    # The same 7 spans and attributes straight on the SDK, beside a bare run: no callbacks,
    # no logic; what any design that records this span tree through the SDK pays at least.
    attrs = lambda n, key="attribute": {f"gen_ai.{key}_{i}": "value" for i in range(n)}
    root = sdk.start_span("invoke_workflow chat", attributes=attrs(11))
    ctx = trace.set_span_in_context(root)
    for node, inner in (("agent", "chat model"), ("tools", "execute_tool get_weather"),
                        ("agent", "chat model")):
        parent = sdk.start_span("invoke_node " + node, context=ctx, attributes=attrs(2))
        child = sdk.start_span(inner, context=trace.set_span_in_context(parent),
                               attributes=attrs(7 if inner == "chat model" else 5))
        if inner == "chat model":
            child.set_attributes({f"gen_ai.end_{i}": 1 for i in range(7)})
        child.end()
        parent.end()
    root.end()

async def arun(n):
    for _ in range(n):
        if who == "sdk-spans":
            sdk_spans()
        await graph.ainvoke(question, config)

def run(n):
    if call == "ainvoke":
        asyncio.run(arun(n))
    else:
        for _ in range(n):
            if who == "sdk-spans":
                sdk_spans()
            graph.invoke(question, config)

run(3)  # warm-up: first-call caches, genai-prices' snapshot
run(runs)
"""

WHO = ["bare", "noop-handler", "sdk-spans", "spans-only", "chatter-otel", "chatter-otel-unsampled",
       "openllmetry", "official", "openinference"]  # fmt: skip


def venv() -> Path:
    """The benchmark's venv: the project's pinned LangChain/LangGraph, chatter-otel from this
    checkout, the peers. Made once (about a minute)."""
    python = VENV / "bin" / "python"
    marker = VENV / ".peers"
    # chatter-otel editable: the benchmark measures this checkout as it is now
    packages = ["-e", f"{ROOT}[instruments]", "langchain", "langchain-openai", *PEERS]
    if marker.exists() and marker.read_text() == "\n".join(packages):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    constraints = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if not line.startswith("opentelemetry-util-genai==")]  # fmt: skip
    pins = VENV / "constraints.txt"
    pins.write_text("\n".join(constraints) + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(pins)]
    subprocess.run([*pip, *packages], check=True)
    marker.write_text("\n".join(packages))
    return python


def instructions(python: Path, who: str, call: str, runs: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0",
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "false"}  # fmt: skip
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         str(python), "-c", WORKLOAD, who, call, str(runs)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{who} {call}: {proc.stderr[-3000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    python = venv()
    jobs = [(who, call, n) for call in ("invoke", "ainvoke") for who in WHO
            for n in (args.short, args.short + args.runs)]  # fmt: skip
    # one valgrind per core: the counts do not depend on what else runs
    with ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(zip(jobs, pool.map(lambda j: instructions(python, *j), jobs), strict=True))
    out: dict[str, dict[str, float]] = {}
    for call in ("invoke", "ainvoke"):
        res = {who: (counts[who, call, args.short + args.runs] - counts[who, call, args.short])
                    / args.runs for who in WHO}  # fmt: skip
        out[call] = res
        bare = res["bare"]
        added = {w: v - bare for w, v in res.items()}
        print(f"{call}: instructions per run (callgrind, {args.runs} runs)")
        print(f"{'':<24} {'per run':>12} {'added':>12} {'/ OpenLLMetry':>14} {'/ no-op':>8}")
        for who, value in res.items():
            if who == "bare":
                print(f"{who:<24} {value:>12,.0f}")
                continue
            print(f"{who:<24} {value:>12,.0f} {added[who]:>12,.0f} "
                  f"{added[who] / added['openllmetry']:>14.2f} "
                  f"{added[who] / added['noop-handler']:>8.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "runs": args.runs}, indent=2))


if __name__ == "__main__":
    main()
