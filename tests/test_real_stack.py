"""The real stack: the app -> OTLP -> the collector running the shipped config -> Jaeger v2 and
Prometheus (and a stand-in OTLP receiver where the config's Tempo exporter sends: Tempo itself is
not built here, see the README). Binaries from `make stack-bin`; a missing one fails the test."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from langchain_core.messages import HumanMessage
from langgraph.types import Command

from chatter_otel import configure, last_run, track_workflow
from chatter_otel.reference.agent_demo import build_approval_graph, build_weather_agent
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.sinks.metrics import AGENT_BUCKETS, DURATION_BUCKETS, WORKFLOW_BUCKETS
from tests.conftest import start_grpc_receiver
from tests.stack import (
    INPROCESS_JOB,
    ROOT,
    Stack,
    binaries,
    http_get,
    start_stack,
    stop_stack,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from chatter_otel.traces.spans import SpanRecord

SERVICE, ENVIRONMENT = "chat-api-stack", "stack-test"
# The app's own metrics as Prometheus names them (through the collector or in-process alike)
TOKENS = "gen_ai_client_token_usage_sum"
CALLS = "gen_ai_client_operation_duration_seconds_count"
COST = "chatter_gen_ai_cost_USD_total"
TTFC = "gen_ai_client_operation_time_to_first_chunk_seconds"
CHUNK = "gen_ai_client_operation_time_per_output_chunk_seconds"
CONV_COST = "chatter_gen_ai_conversation_cost_USD_total"  # derived by the collector
JOB, CHAT, FAILED = f'job="{SERVICE}"', 'gen_ai_operation_name="chat"', 'error_type!=""'
INPUT, OUTPUT = 'gen_ai_token_type="input"', 'gen_ai_token_type="output"'
Q = {"messages": [HumanMessage("What is the weather in Oslo?")]}
OK_RUNS, STREAMED_RUNS, FAILED_RUNS = 100, 10, 3


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tempo, server = start_grpc_receiver()
    s = start_stack(tmp_path_factory.mktemp("stack"), tempo)
    try:
        yield s
    finally:
        stop_stack(s)
        server.stop(grace=None)


@pytest.fixture(scope="module")
def workload(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Chats through configure(), exported over OTLP/gRPC to the collector and, for the
    comparison, to the local store too: ok, streamed, failing, and one paused then resumed."""
    store_path = tmp_path_factory.mktemp("store") / "traces.db"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "OTEL_EXPORTER_OTLP_ENDPOINT": stack.otlp_grpc,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRICS_EXPORTER": "otlp",  # the app's metrics, through the collector
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_RESOURCE_ATTRIBUTES": f"deployment.environment.name={ENVIRONMENT}",
        }.items():
            mp.setenv(name, value)
        tel = configure(service_name=SERVICE, exporter="otlp,local", trace_store=str(store_path),
                        set_global=False, prices=LOCAL_MODEL_PRICES)  # fmt: skip
        try:
            # Warm-up: one of each kind, so every series exists (and was scraped) before the
            # measured chats; Prometheus cannot know a series it first sees was 0 just before.
            warm = _chats(tel, "warm", ok=4, streamed=1, failed=1, llm_down=1)
            assert tel.force_flush()
            wait_until(lambda: _scraped_twice(stack), "the warm-up series scraped", timeout=60)
            ready = start = time.time()
            runs = _chats(tel, "stack", ok=OK_RUNS, streamed=STREAMED_RUNS, failed=FAILED_RUNS,
                          llm_down=2)  # fmt: skip
            assert tel.force_flush()
            store = tel.trace_store
            assert store is not None
            hitl = [store.trace(runs.pop("hitl-paused").trace_id),
                    store.trace(runs.pop("hitl-resumed").trace_id)]  # fmt: skip
            warm_hitl = [store.trace(warm.pop(k).trace_id)
                         for k in ("hitl-paused", "hitl-resumed")]  # fmt: skip
            local = {cid: store.trace(run.trace_id) for cid, run in runs.items()}
            warm_local = [store.trace(run.trace_id) for run in warm.values()]
        finally:
            tel.shutdown()
    return {"runs": runs, "local": local, "store": str(store_path), "hitl": hitl,
            "warm": [*warm_local, *warm_hitl], "warm_runs": warm, "start": start,
            "ready": ready}  # fmt: skip


def _scraped_twice(stack: Stack) -> bool:
    counts = stack.promql(f"count_over_time({TOKENS}{{{JOB},{INPUT}}}[1m])")
    errors = stack.promql(f"count_over_time({CALLS}{{{JOB},{CHAT},{FAILED}}}[1m])")
    return (
        bool(counts) and bool(errors) and all(float(r["value"][1]) >= 2 for r in [*counts, *errors])
    )


def _chats(tel: Any, tag: str, *, ok: int, streamed: int, failed: int, llm_down: int
           ) -> dict[str, Any]:  # fmt: skip
    """The runs of one phase by correlation id: ok chats over four conversations, streamed
    ones, ones the app fails after the graph, LLM calls to a server that is down, and a graph
    paused by an interrupt then resumed."""
    from langchain_openai import ChatOpenAI

    runs: dict[str, Any] = {}
    graph = build_chat_graph()
    for i in range(ok):
        with track_workflow("turn", conversation_id=f"conv-{i % 4}",
                            correlation_id=f"{tag}-ok-{i}") as run:  # fmt: skip
            graph.invoke(Q)
        runs[run.correlation_id] = run

    async def one_streamed(i: int) -> Any:
        async with track_workflow("turn", conversation_id="conv-s",
                                  correlation_id=f"{tag}-stream-{i}") as run:  # fmt: skip
            async for _ in graph.astream(Q, stream_mode="messages"):
                pass
        return run

    for i in range(streamed):
        run = asyncio.run(one_streamed(i))
        runs[run.correlation_id] = run
    for i in range(failed):
        with pytest.raises(Boom), track_workflow(
            "turn", conversation_id="conv-e", correlation_id=f"{tag}-err-{i}"
        ) as run:  # fmt: skip
            graph.invoke(Q)
            raise Boom
        runs[run.correlation_id] = run
    down = ChatOpenAI(
        model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0
    )  # nothing listens there: the LLM call fails
    for i in range(llm_down):
        with (
            pytest.raises(Exception),
            track_workflow(
                "turn", conversation_id="conv-e", correlation_id=f"{tag}-err-llm-{i}"
            ) as run,
        ):
            down.invoke("hello")
        runs[run.correlation_id] = run
    # an agent as the app's outermost run (invoke_agent, with its own duration metric)
    build_weather_agent().invoke({"messages": [("user", "Weather in Lima?")]}, {"metadata": {
        "conversation_id": "conv-agent", "correlation_id": f"{tag}-agent"}})  # fmt: skip
    agent_run = last_run()
    assert agent_run is not None and agent_run.correlation_id == f"{tag}-agent"
    runs[agent_run.correlation_id] = agent_run
    approval = build_approval_graph()
    cfg: Any = {"configurable": {"thread_id": "stack-thread"}}  # one conversation, both phases
    approval.invoke({"question": "Refund?"}, cfg)
    runs["hitl-paused"] = last_run()
    approval.invoke(Command(resume="yes"), cfg)
    runs["hitl-resumed"] = last_run()
    return runs


def _jaeger_trace(stack: Stack, trace_id: str) -> list[dict[str, Any]] | None:
    """The OTLP JSON resource spans Jaeger's v3 API has for a trace, None if it has none."""
    try:
        doc = http_get(f"{stack.jaeger}/api/v3/traces/{trace_id}")
    except Exception:
        return None
    spans = doc.get("result", {}).get("resourceSpans")
    return spans or None


def _sampled(stack: Stack, workload: dict[str, Any]) -> dict[str, bool]:
    """Which runs' traces reached Jaeger, once the tail sampler decided (errors first)."""
    runs = workload["runs"]
    errors = [r for c, r in runs.items() if c.startswith("stack-err")]
    wait_until(lambda: all(_jaeger_trace(stack, r.trace_id) for r in errors),
               "the error traces in jaeger", timeout=60)  # fmt: skip
    # The sampler's decisions leave in batches (2 s): settled once nothing new came for 4 s.
    seen: dict[str, bool] = {}
    settled_at = time.monotonic()
    while time.monotonic() - settled_at < 4:
        stack.check_alive()
        now = {c: _jaeger_trace(stack, r.trace_id) is not None for c, r in runs.items()}
        if now != seen:
            seen, settled_at = now, time.monotonic()
        time.sleep(0.5)
    return seen


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatter_otel", *argv], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


# -- the shipped config, the built collector ---------------------------------------------------


# The shipped configs as the collector is started with each: one host; an agent; a gateway
# (the one-host config with gateway.yaml merged over it).
CONFIGS = [["otel-collector.yaml"], ["agent.yaml"], ["otel-collector.yaml", "gateway.yaml"]]


def test_the_shipped_configs_validate_on_the_built_collector() -> None:
    otelcol = binaries()["OTELCOL"]
    for files in CONFIGS:
        args = [a for f in files for a in ("--config", str(ROOT / "collector" / f))]
        proc = subprocess.run([otelcol, "validate", *args], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 0, (files, proc.stderr)
        assert "deprecated" not in proc.stderr, files
    built = yaml.safe_load(subprocess.run([otelcol, "components"], capture_output=True, text=True,
                                          timeout=60, check=True).stdout)  # fmt: skip
    manifest = yaml.safe_load((ROOT / "collector/builder-config.yaml").read_text())
    configs = [yaml.safe_load((ROOT / "collector" / f).read_text()) for f in
               ("otel-collector.yaml", "agent.yaml", "gateway.yaml")]  # fmt: skip
    assert built["buildinfo"]["version"] == manifest["dist"]["version"]
    for kind in ("receivers", "processors", "exporters", "connectors", "extensions"):
        modules = {f"{c['module']}" for c in built[kind]}
        assert modules == {c["gomod"] for c in manifest[kind]}, kind
        # exactly the components the configs use: nothing missing, nothing extra
        used = {name.split("/", 1)[0] for cfg in configs for name in cfg.get(kind) or {}}
        assert {c["name"] for c in built[kind]} == used, kind


# -- traces: Jaeger ------------------------------------------------------------------------------


def test_tail_sampling_keeps_errors_and_a_baseline_and_both_backends_agree(
    stack: Stack, workload: dict[str, Any]
) -> None:
    sampled = _sampled(stack, workload)
    errors = [c for c in sampled if c.startswith("stack-err")]
    assert errors and all(sampled[c] for c in errors)
    kept_ok = sum(sampled[c] for c in sampled if not c.startswith("stack-err"))
    # 10% baseline of 110 ok runs: binomial, mean 11 (P(0) and P(> 35) are below 1e-5)
    assert 1 <= kept_ok <= 35, kept_ok
    # the Tempo exporter received exactly the traces Jaeger has
    kept = {workload["runs"][c].trace_id for c, yes in sampled.items() if yes}
    wait_until(lambda: kept <= _tempo_traces(stack), "the tempo stand-in", timeout=30)
    ours = {r.trace_id for r in workload["runs"].values()}
    assert _tempo_traces(stack) & ours == kept


def _tempo_traces(stack: Stack) -> set[str]:
    return {span.trace_id.hex() for _, span in stack.tempo_stand_in.spans()}


def test_find_then_trace_from_jaeger_is_the_local_tree(
    stack: Stack, workload: dict[str, Any]
) -> None:
    sampled = _sampled(stack, workload)
    picks = ["stack-err-0", next(c for c in sampled if sampled[c] and "ok" in c)]
    stream = next((c for c in sampled if sampled[c] and "stream" in c), None)
    picks += [stream] if stream else []
    for cid in picks:
        run = workload["runs"][cid]
        found = _cli("find", "--correlation-id", cid, "--from", "jaeger", "--url", stack.jaeger,
                     "--service", SERVICE, "--json")  # fmt: skip
        assert found.returncode == 0, found.stderr
        (hit,) = json.loads(found.stdout)
        assert hit["trace_id"] == run.trace_id
        assert hit["input_tokens"] == run.usage.prompt_tokens
        assert hit["output_tokens"] == run.usage.completion_tokens
        assert hit["cost"] == pytest.approx(float(run.usage.cost))
        from_jaeger = _cli("trace", run.trace_id, "--from", "jaeger", "--url", stack.jaeger)
        from_store = _cli("trace", run.trace_id, "--store", workload["store"])
        assert from_jaeger.returncode == 0, from_jaeger.stderr
        assert from_jaeger.stdout == from_store.stdout  # the same tree, tokens and cost
        assert (
            f"tokens={run.usage.prompt_tokens}/{run.usage.completion_tokens}" in from_jaeger.stdout
        )


def test_jaeger_search_is_filtered_by_the_server(stack: Stack, workload: dict[str, Any]) -> None:
    sampled = _sampled(stack, workload)
    cid = next(c for c in sampled if sampled[c] and "ok" in c)
    # Jaeger's own tag search: only that request's trace comes back, limit 1 or not
    doc = http_get(f"{stack.jaeger}/api/traces", {
        "service": SERVICE, "tags": json.dumps({"chatter.correlation.id": cid}), "limit": 1,
        "lookback": "1h",
    })  # fmt: skip
    (trace,) = doc["data"]
    assert trace["traceID"] == workload["runs"][cid].trace_id
    # the CLI asks the server for it: limit 1 still finds it among the many kept traces
    found = _cli("find", "--correlation-id", cid, "--from", "jaeger", "--url", stack.jaeger,
                 "--service", SERVICE, "--limit", "1", "--json")  # fmt: skip
    assert json.loads(found.stdout)[0]["trace_id"] == workload["runs"][cid].trace_id
    conv = _cli("find", "--conversation-id", "conv-e", "--from", "jaeger", "--url", stack.jaeger,
                "--service", SERVICE, "--json")  # fmt: skip
    measured = {r.trace_id for c, r in workload["runs"].items()
                if sampled[c] and r.conversation_id == "conv-e"}  # fmt: skip
    warm = {r.trace_id for r in workload["warm_runs"].values() if r.conversation_id == "conv-e"}
    got = {h["trace_id"] for h in json.loads(conv.stdout)}
    assert measured <= got <= measured | warm  # the warm-up's failures are kept too


def test_the_resumed_run_links_to_the_paused_one_in_jaeger(
    stack: Stack, workload: dict[str, Any]
) -> None:
    paused, resumed = workload["hitl"]
    p_wf = next(r for r in paused if r.parent_id is None)
    r_wf = next(r for r in resumed if r.parent_id is None)
    # kept by the shipped sampler's human-in-the-loop policy, whatever the baseline drew
    wait_until(lambda: _jaeger_trace(stack, r_wf.trace_id) and _jaeger_trace(stack, p_wf.trace_id),
               "the paused and the resumed trace in jaeger", timeout=60)  # fmt: skip
    doc = http_get(f"{stack.jaeger}/api/traces/{r_wf.trace_id}")
    (trace,) = doc["data"]
    span = next(s for s in trace["spans"] if s["spanID"] == r_wf.span_id)
    refs = [(r["refType"], r["traceID"], r["spanID"]) for r in span["references"]]
    assert ("FOLLOWS_FROM", p_wf.trace_id, p_wf.span_id) in refs
    tags = {t["key"]: t["value"] for t in span["tags"]}
    assert tags["langgraph.thread.id"] == "stack-thread"
    p_doc = http_get(f"{stack.jaeger}/api/traces/{p_wf.trace_id}")
    p_span = next(s for s in p_doc["data"][0]["spans"] if s["spanID"] == p_wf.span_id)
    assert next(log["fields"] for log in p_span["logs"])[0] == {
        "key": "event",
        "type": "string",
        "value": "gen_ai.agent.paused",
    }
    assert {t["key"]: t["value"] for t in p_span["tags"]}["langgraph.checkpoint.id"] == tags[
        "langgraph.checkpoint.id"
    ]


def test_jaeger_keeps_the_traces_across_a_restart(stack: Stack, workload: dict[str, Any]) -> None:
    """Badger on disk: every trace Jaeger had is there after a restart, span for span."""
    sampled = _sampled(stack, workload)
    kept = [workload["runs"][c].trace_id for c, yes in sampled.items() if yes]

    def spans(trace_id: str) -> int:
        found = _jaeger_trace(stack, trace_id) or []
        return sum(len(ss["spans"]) for rs in found for ss in rs["scopeSpans"])

    before = {t: spans(t) for t in kept}
    assert kept and all(before.values())
    (jaeger,) = [p for p in stack.procs if p.name == "jaeger"]
    jaeger.stop()
    jaeger.start()
    wait_until(lambda: (stack.check_alive(), http_get(f"{stack.jaeger}/api/services"))[1],
               "jaeger's query API after the restart")  # fmt: skip
    assert {t: spans(t) for t in kept} == before


# -- metrics: Prometheus, from the app's own metrics and the collector's derived ones ----------


def _spans(traces: list[list[SpanRecord]], operation: str) -> list[SpanRecord]:
    return [r for t in traces for r in t if r.attributes.get("gen_ai.operation.name") == operation]


def _measured(workload: dict[str, Any]) -> list[list[SpanRecord]]:
    return [*workload["local"].values(), *workload["hitl"]]


def _value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def _totals(traces: list[list[SpanRecord]]) -> dict[str, Any]:
    chats = _spans(traces, "chat")
    per_conv: dict[str, float] = defaultdict(float)
    for r in [*_spans(traces, "invoke_workflow"), *_spans(traces, "invoke_agent")]:
        a = r.attributes
        if a.get("chatter.workflow.id") and "gen_ai.usage.cost.amount" in a:
            per_conv[str(a["gen_ai.conversation.id"])] += float(a["gen_ai.usage.cost.amount"])
    calls = Counter(str(r.attributes["gen_ai.request.model"]) for r in chats)
    return {
        "chats": chats,
        "calls": calls,
        "errors": sum(r.status == "ERROR" for r in chats),
        "in": sum(int(r.attributes.get("gen_ai.usage.input_tokens", 0)) for r in chats),
        "out": sum(int(r.attributes.get("gen_ai.usage.output_tokens", 0)) for r in chats),
        "cost": math.fsum(float(r.attributes.get("gen_ai.usage.cost.amount", 0)) for r in chats),
        "streamed": sum("gen_ai.response.time_to_first_chunk" in r.attributes for r in chats),
        "per_conv": dict(per_conv),
    }


def _sum(stack: Stack, metric: str) -> float | None:
    result = stack.promql(f"sum({metric})")
    return _value(result) if result else None


def _all_scraped(stack: Stack, workload: dict[str, Any]) -> dict[str, Any]:
    """Waits until Prometheus has every request of both phases; the totals of both."""
    t = _totals([*_measured(workload), *workload["warm"]])
    wait_until(lambda: _sum(stack, f"{TOKENS}{{{JOB},{INPUT}}}") == t["in"]
               and _sum(stack, f"{CALLS}{{{JOB},{CHAT}}}") == len(t["chats"])
               and _sum(stack, f'traces_span_metrics_calls_total{{{CHAT}}}') == len(t["chats"])
               and _sum(stack, CONV_COST)
               == pytest.approx(math.fsum(t["per_conv"].values()), rel=1e-9),
               "prometheus to scrape every request", timeout=60)  # fmt: skip
    return t


def test_the_metrics_count_every_request(stack: Stack, workload: dict[str, Any]) -> None:
    """Sampled or not, every call is in the app's metrics (through the collector) and in the
    collector's derived ones, exactly."""
    t = _all_scraped(stack, workload)
    assert t["errors"] == 3 and t["streamed"] >= (STREAMED_RUNS + 1) * 2
    assert _sum(stack, f"{TOKENS}{{{JOB},{OUTPUT}}}") == t["out"]
    assert _sum(stack, f"{COST}{{{JOB}}}") == pytest.approx(t["cost"], rel=1e-9)
    per_le = f"sum by (le) (gen_ai_client_operation_duration_seconds_bucket{{{JOB},{CHAT}}})"
    buckets = {b["metric"]["le"]: float(b["value"][1]) for b in stack.promql(per_le)}
    assert buckets["+Inf"] == len(t["chats"])
    ordered = [buckets[k] for k in sorted(buckets, key=float)]
    assert ordered == sorted(ordered)  # cumulative
    assert _sum(stack, f"{TTFC}_count{{{JOB}}}") == t["streamed"]
    assert _sum(stack, f"{CALLS}{{{JOB},{CHAT},{FAILED}}}") == t["errors"]
    by_model = {
        s["metric"]["gen_ai_request_model"]: float(s["value"][1])
        for s in stack.promql(f"sum by (gen_ai_request_model) ({CALLS}{{{JOB},{CHAT}}})")
    }
    assert by_model == dict(t["calls"])
    # the collector's span metrics agree, errors by span status
    err = f'traces_span_metrics_calls_total{{{CHAT},status_code="STATUS_CODE_ERROR"}}'
    assert _sum(stack, err) == t["errors"]
    got = {
        s["metric"]["gen_ai_conversation_id"]: float(s["value"][1])
        for s in stack.promql(f"sum by (gen_ai_conversation_id) ({CONV_COST})")
    }
    assert got == pytest.approx(t["per_conv"], rel=1e-9)


def _bucket_of(value: float, bounds: list[float]) -> tuple[float, float]:
    lower = 0.0
    for b in bounds:
        if value <= b:
            return lower, b
        lower = b
    return lower, math.inf


# Each panel's query, and what it reads: (metric with its matchers, the label it groups by, the
# range); the error-rate panel is the ratio of two of them.
_PANELS: dict[str, list[tuple[str, str, str]]] = {
    "Tokens per second by model": [
        (f"{TOKENS}{{{JOB},{INPUT}}}", "gen_ai_request_model", "5m"),
        (f"{TOKENS}{{{JOB},{OUTPUT}}}", "gen_ai_request_model", "5m"),
    ],
    "Cost per hour by provider (USD)": [(f"{COST}{{{JOB}}}", "gen_ai_provider_name", "1h")],
    "LLM calls per second by model": [(f"{CALLS}{{{JOB},{CHAT}}}", "gen_ai_request_model", "5m")],
    "Top conversations by cost, last hour (USD)": [
        (f"{CONV_COST}{{{JOB}}}", "gen_ai_conversation_id", "1h")],
}  # fmt: skip


def _increase_seen(
    stack: Stack, metric: str, label: str, window: str
) -> dict[str, tuple[float, float]]:
    """For each group, what the window holds: its value now minus its first sample in the
    window (a counter's minimum; both exact, the totals having been checked against the spans),
    and the most PromQL's extrapolation can multiply that by: it extends a series by at most
    1.1 average sample intervals at each end (Prometheus' extrapolatedRate), so by at most
    1 + 2.2 / (samples - 1)."""
    now = stack.promql(f"sum by ({label}) ({metric})")
    first = stack.promql(f"sum by ({label}) (min_over_time({metric}[{window}]))")
    samples = stack.promql(f"min by ({label}) (count_over_time({metric}[{window}]))")
    base = {s["metric"].get(label, ""): float(s["value"][1]) for s in first}
    count = {s["metric"].get(label, ""): float(s["value"][1]) for s in samples}
    out = {}
    for series in now:
        key = series["metric"].get(label, "")
        out[key] = (float(series["value"][1]) - base[key], 1 + 2.2 / max(count[key] - 1, 1))
    return out


def _filled_buckets(stack: Stack, histogram: str) -> tuple[float, float]:
    """The lower edge of the first bucket of ``histogram`` (this service's) holding a value
    and the upper edge of the last: where any quantile of it must lie."""
    rows = stack.promql(f"sum by (le) ({histogram}_bucket{{{JOB}}})")
    counts = sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in rows)
    assert counts and counts[-1][1] > 0, counts
    edges = [0.0] + [le for le, _ in counts]
    filled = [i for i, (_, c) in enumerate(counts) if c > (counts[i - 1][1] if i else 0)]
    return edges[filled[0]], edges[filled[-1] + 1]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (ROOT / "collector/grafana/dashboards/chatter-genai.json").read_text()
    )
    return doc


def _expr(target: dict[str, Any], **variables: str) -> str:
    """A panel's query with the dashboard's variables set as Grafana would."""
    expr = str(target["expr"])
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_gives_the_right_number(
    stack: Stack, workload: dict[str, Any]
) -> None:
    """Each panel's query, evaluated in Prometheus after the measured chats with the
    dashboard's variables set to this service and its environment, against the data its window
    holds: rates and increases between the true increase and the most PromQL's extrapolation
    adds (see _increase_seen); quantiles inside the bucket of the true value. Another
    environment gives nothing."""
    _all_scraped(stack, workload)
    # 20 s of samples at least since the warm-up: the extrapolation bound gets tight (~10%)
    time.sleep(max(0.0, workload["ready"] + 20 - time.time()))
    m = _totals(_measured(workload))
    assert time.time() - workload["start"] < 300 - 30, "the measured chats left the window"
    measured = _measured(workload)
    quantiles = {  # the true values, and the buckets of the histogram the panel reads
        "LLM call latency (p50/p95/p99)": (
            sorted(r.duration_ms / 1000 for r in m["chats"]), DURATION_BUCKETS),
        "Time to first chunk (p50/p95/p99)": (sorted(
            float(r.attributes["gen_ai.response.time_to_first_chunk"]) for r in m["chats"]
            if "gen_ai.response.time_to_first_chunk" in r.attributes), DURATION_BUCKETS),
        "Run duration (p50/p95/p99)": (sorted(
            r.duration_ms / 1000 for r in _spans(measured, "invoke_workflow")),
            WORKFLOW_BUCKETS),
        "Agent run duration (p50/p95/p99)": (sorted(
            r.duration_ms / 1000 for r in _spans(measured, "invoke_agent")), AGENT_BUCKETS),
        "Tool call duration (p95) by tool": (sorted(
            r.duration_ms / 1000 for r in _spans(measured, "execute_tool")), DURATION_BUCKETS),
    }  # fmt: skip
    mine = {"service": SERVICE, "model": ".*", "environment": ENVIRONMENT}
    checked = 0
    for panel in _dashboard()["panels"]:
        title = panel["title"]
        for n, target in enumerate(panel["targets"]):
            result = stack.promql(_expr(target, **mine))
            assert result, (title, target["expr"])
            elsewhere = stack.promql(_expr(target, **{**mine, "environment": "elsewhere"}))
            assert elsewhere == [], title
            got = {next(iter(s["metric"].values()), ""): float(s["value"][1]) for s in result}
            if title == "Time per output chunk (p50/p95)":  # gaps are on no span: the buckets
                lo, hi = _filled_buckets(stack, CHUNK)
                assert lo <= _value(result) <= hi * (1 + 1e-9), (title, lo, hi, result)
            elif title in quantiles:
                values, bounds = quantiles[title]
                phi = float(re.match(r"histogram_quantile\(([0-9.]+)", target["expr"])[1])
                # PromQL's rank is phi * n: between the ceil(phi * n)-th and the next order
                # statistic (one slow outlier at the top moves nothing else)
                k = phi * len(values)
                below = values[max(math.ceil(k) - 1, 0)]
                true = values[min(int(k), len(values) - 1)]
                lo, hi = _bucket_of(below, bounds)[0], _bucket_of(true, bounds)[1]
                # PromQL interpolates inside the bucket in floating point: a quantile at the
                # bucket's lower edge comes out as 0.009999999999999998 for 0.01
                assert lo * (1 - 1e-9) <= _value(result) <= hi * (1 + 1e-9), (
                    title, phi, true, result)  # fmt: skip
            elif title == "LLM error rate":
                ((errors, e_max),) = _increase_seen(
                    stack, f"{CALLS}{{{JOB},{CHAT},{FAILED}}}", "x", "5m"
                ).values()
                ((calls, c_max),) = _increase_seen(
                    stack, f"{CALLS}{{{JOB},{CHAT}}}", "x", "5m"
                ).values()
                assert errors / calls / c_max <= got[""] <= errors * e_max / calls, title
                assert errors >= m["errors"]  # the measured round's failures are in it
            else:
                metric, label, window = _PANELS[title][n]
                seen = _increase_seen(stack, metric, label, window)
                per_s = 300.0 if window == "5m" else 1.0
                want = {k: (v / per_s, most) for k, (v, most) in seen.items()}
                if title.startswith("Top conversations"):  # the ten costliest of them
                    want = dict(sorted(want.items(), key=lambda kv: -kv[1][0])[:10])
                    assert target.get("instant") is True and target.get("range") is False
                assert set(got) == set(want), title
                for key, (value, most) in want.items():
                    assert value * 0.999 <= got[key] <= value * most + 1e-12, (
                        title, key, got[key], value, most)  # fmt: skip
            checked += 1
    assert checked == 21
    # and the measured round is what those windows saw, give or take the warm-up's tail
    seen_in = _increase_seen(stack, f"{TOKENS}{{{JOB},{INPUT}}}", "x", "5m")[""][0]
    assert m["in"] <= seen_in <= m["in"] + _totals(workload["warm"])["in"]


def test_the_dashboard_reads_the_in_process_exporter_too(
    stack: Stack, workload: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_METRICS_EXPORTER=prometheus, no collector on the metrics' way: Prometheus scrapes
    the app, and every panel but the collector-derived one reads it under the same names,
    with the Service variable set to the scrape job; its totals are the spans' totals."""
    del workload  # the collector's series exist too: the variables keep them apart
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(stack.app_metrics_port))
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=inproc")
    job = f'job="{INPROCESS_JOB}"'
    tel = configure(service_name="chat-api-inprocess", exporter="local",
                    trace_store=str(tmp_path / "traces.db"), set_global=False,
                    prices=LOCAL_MODEL_PRICES)  # fmt: skip
    try:
        warm = _chats(tel, "inproc-warm", ok=2, streamed=1, failed=0, llm_down=1)
        wait_until(lambda: all(
            r and float(r[0]["value"][1]) >= 2 for r in (
                stack.promql(f"min(count_over_time({CALLS}{{{job},{CHAT}}}[1m]))"),
                stack.promql(f"min(count_over_time({CALLS}{{{job},{FAILED}}}[1m]))"))),
            "the in-process series scraped twice", timeout=60)  # fmt: skip
        runs = _chats(tel, "inproc", ok=6, streamed=2, failed=0, llm_down=1)
        store = tel.trace_store
        assert store is not None and tel.force_flush()
        t = _totals([store.trace(r.trace_id) for r in [*warm.values(), *runs.values()]])
        wait_until(lambda: _sum(stack, f"{CALLS}{{{job},{CHAT}}}") == len(t["chats"]),
                   "prometheus to scrape the app", timeout=60)  # fmt: skip
        assert _sum(stack, f"{TOKENS}{{{job},{INPUT}}}") == t["in"]
        assert _sum(stack, f"{TOKENS}{{{job},{OUTPUT}}}") == t["out"]
        assert _sum(stack, f"{COST}{{{job}}}") == pytest.approx(t["cost"], rel=1e-9)
        assert _sum(stack, f"{TTFC}_count{{{job}}}") == t["streamed"]
        assert _sum(stack, f"{CALLS}{{{job},{CHAT},{FAILED}}}") == t["errors"] == 2
        time.sleep(3)  # a few samples after the measured chats
        variables = {"service": INPROCESS_JOB, "model": ".*", "environment": "inproc"}
        models = set(t["calls"])
        for panel in _dashboard()["panels"]:
            for target in panel["targets"]:
                result = stack.promql(_expr(target, **variables))
                if panel["title"].startswith("Top conversations"):
                    assert result == [], "no conversation ids in the app's metrics"
                    continue
                assert result, (panel["title"], target["expr"])
                values = [float(s["value"][1]) for s in result]
                assert all(v > 0 and math.isfinite(v) for v in values), (panel["title"], result)
                if "by (gen_ai_request_model)" in target["expr"]:
                    keys = {s["metric"]["gen_ai_request_model"] for s in result}
                    assert keys <= models and keys, (panel["title"], keys, models)
    finally:
        tel.shutdown()


def test_the_reference_app_over_otlp_http_to_jaeger(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference app served on loopback, exporting over OTLP/HTTP to the collector: a
    request whose model is down fails (500), its error trace is kept by the tail sampler, and in
    Jaeger every span of it, the app's HTTP server span included, carries its correlation id."""
    from chatter_otel.reference.app import create_app, create_tables
    from tests.test_reference_app import ENV, Served

    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", stack.otlp_http)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("CHATTER_MODEL_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens
    app = create_app(database_url=f"sqlite+aiosqlite:///{tmp_path}/app.db", set_global=False)
    asyncio.run(create_tables(app))
    served = Served(app)
    try:
        status, headers, _ = served.request("POST", "/chat", {"message": "weather in Oslo"},
                                            {"X-Correlation-ID": "inc-77"})  # fmt: skip
        assert status == 500
        assert headers["x-correlation-id"] == "inc-77"
        trace_id = headers["traceresponse"].split("-")[1]
        assert app.state.telemetry.force_flush()
    finally:
        served.close()
    wait_until(lambda: _jaeger_trace(stack, trace_id), "the failed request in jaeger", timeout=60)
    found = _cli("find", "--correlation-id", "inc-77", "--from", "jaeger", "--url", stack.jaeger,
                 "--service", "chatter-reference-app", "--json")  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert [h["trace_id"] for h in json.loads(found.stdout)] == [trace_id]
    (trace,) = http_get(f"{stack.jaeger}/api/traces/{trace_id}")["data"]
    names = {s["operationName"] for s in trace["spans"]}
    assert {"POST /chat", "invoke_workflow chat", "chat gpt-4o-mini"} <= names, names
    for span in trace["spans"]:
        tags = {t["key"]: t["value"] for t in span["tags"]}
        assert tags.get("chatter.correlation.id") == "inc-77", span["operationName"]
    chat = next(s for s in trace["spans"] if s["operationName"] == "chat gpt-4o-mini")
    assert {t["key"]: t["value"] for t in chat["tags"]}["error"] is True
    shown = _cli("trace", trace_id, "--from", "jaeger", "--url", stack.jaeger)
    assert (
        shown.returncode == 0
        and "ERROR" in shown.stdout
        and "correlation_id=inc-77" in shown.stdout
    )


@pytest.mark.parametrize("scrub", [False, True], ids=["follows-the-app", "SCRUB_CONTENT=true"])
def test_content_follows_the_app_unless_the_collector_scrubs_it(
    tmp_path: Path, scrub: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app with capture on: its prompts reach Jaeger through the shipped config as it is;
    with the collector's switch on, no content attribute does."""
    tempo, server = start_grpc_receiver()
    stack = start_stack(tmp_path, tempo, collector_env={"SCRUB_CONTENT": "true"} if scrub else {})
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", stack.otlp_grpc)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        tel = configure(service_name=SERVICE, exporter="otlp", set_global=False,
                        prices=LOCAL_MODEL_PRICES, capture_content=True)  # fmt: skip
        try:
            with pytest.raises(Boom), track_workflow("turn", correlation_id="content-1") as run:
                build_chat_graph().invoke(Q)
                raise Boom  # an error trace: tail sampling keeps it
            assert tel.force_flush()
        finally:
            tel.shutdown()
        doc = wait_until(lambda: http_get(f"{stack.jaeger}/api/traces/{run.trace_id}"),
                         "the trace in Jaeger")  # fmt: skip
        spans = doc["data"][0]["spans"]
        chats = [sp for sp in spans if sp["operationName"].startswith("chat ")]
        assert len(chats) == 2
        keys = {t["key"] for sp in chats for t in sp["tags"]}
        content = {"gen_ai.input.messages", "gen_ai.output.messages"}
        assert (content & keys == set()) if scrub else (content <= keys), keys
    finally:
        stop_stack(stack)
        server.stop(grace=None)
