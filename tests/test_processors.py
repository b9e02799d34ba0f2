"""MonitoringService, live analytics and GenAI metrics, fed by span processors from real runs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import configure, track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.sinks.analytics import LiveAnalytics
from chatter_otel.sinks.metrics import DURATION_BUCKETS, TOKEN_BUCKETS
from chatter_otel.sinks.monitoring import LLMMetrics, MonitoringService

if TYPE_CHECKING:
    from collections.abc import Iterator

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}


class Setup:
    def __init__(self, **options: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.tel = configure(
            tracer_provider=self.provider, meter_provider=self.meters, prices=LOCAL_MODEL_PRICES,
            **options,
        )  # fmt: skip

    def chats(self) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith("chat ")]

    def flush(self) -> None:
        self.tel.force_flush()
        for p in self.provider._active_span_processor._span_processors:
            p.force_flush()

    def metrics(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend(m.data.data_points)
        return out


@pytest.fixture
def setup() -> Iterator[Any]:
    made: list[Setup] = []

    def _make(**options: Any) -> Setup:
        s = Setup(**options)
        made.append(s)
        return s

    yield _make
    for s in made:
        s.tel.shutdown()
        s.provider.shutdown()


async def _runs(fail: bool = False) -> None:
    graph = build_chat_graph()

    def sync_turn() -> None:
        with track_workflow("sync", conversation_id="c-sync", user_id="u1"):
            graph.invoke(Q)

    await asyncio.to_thread(sync_turn)
    async with track_workflow("async", conversation_id="c-async", user_id="u1"):
        await graph.ainvoke(Q)
    async with track_workflow("streamed", conversation_id="c-stream", user_id="u2"):
        async for _ in graph.astream(Q, stream_mode="messages"):
            pass
    if fail:
        with pytest.raises(RuntimeError):
            async with track_workflow("failing", conversation_id="c-fail", user_id="u2"):
                await graph.ainvoke(Q)
                raise RuntimeError("after the graph")


async def test_builtin_monitoring_service(setup: Any) -> None:
    s = setup()
    assert isinstance(s.tel.monitoring, MonitoringService)
    await _runs(fail=True)
    s.flush()
    stats = s.tel.monitoring.get_workflow_stats()
    assert stats["workflow_ops"] == {
        "started": 4, "finished": 4, "failed": 1, "evicted": 0, "active": 0,
    }  # fmt: skip
    chats = s.chats()
    assert stats["providers"]["chatter.local"]["calls"] == len(chats) == 8
    assert stats["models"]["chatter-local-1"]["input_tokens"] == sum(
        c.attributes["gen_ai.usage.input_tokens"] for c in chats
    )
    assert stats["models"]["chatter-local-1"]["cost"] == pytest.approx(
        sum(c.attributes["gen_ai.usage.cost.amount"] for c in chats)
    )
    recent = {w.conversation_id: w for w in stats["recent"]}
    per_run = sum(c.attributes["gen_ai.usage.input_tokens"] + c.attributes[
        "gen_ai.usage.output_tokens"] for c in chats) // 4  # fmt: skip
    for conv in ("c-sync", "c-async", "c-stream", "c-fail"):
        wf = recent[conv]
        assert wf.token_usage == {"chatter.local": per_run}
        assert wf.tool_calls == 1
        assert wf.duration_ms is not None
    assert recent["c-fail"].errors == ["RuntimeError"]
    assert recent["c-sync"].errors == [] and recent["c-sync"].user_id == "u1"


class Recording:
    """A user-supplied service with the app's API, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.n = 0

    def start_workflow_tracking(
        self,
        user_id: str,
        conversation_id: str,
        provider_name: str = "",
        model_name: str = "",
        workflow_config: Any = None,
        correlation_id: str = "",
    ) -> str:
        self.n += 1
        wid = f"{conversation_id}#{self.n}"
        self.calls.append(("start", (wid, user_id, correlation_id, workflow_config)))
        return wid

    def update_workflow_metrics(
        self,
        workflow_id: str,
        token_usage: Any = None,
        tool_calls: Any = None,
        retrieval_context_size: Any = None,
        memory_usage_mb: Any = None,
        error: Any = None,
    ) -> None:
        self.calls.append(("update", (workflow_id, token_usage, tool_calls, error)))

    def finish_workflow_tracking(self, workflow_id: str, user_satisfaction: Any = None) -> None:
        self.calls.append(("finish", workflow_id))

    def record_llm_operation(self, m: LLMMetrics) -> None:
        self.calls.append(("llm", m))


async def test_user_supplied_service_gets_exact_calls(setup: Any) -> None:
    svc = Recording()
    s = setup(monitoring=svc)
    graph = build_chat_graph()

    async def turn(i: int) -> None:
        async with track_workflow("t", conversation_id=f"c{i}", correlation_id=f"r{i}"):
            await graph.ainvoke(Q)

    await asyncio.gather(*(turn(i) for i in range(5)))
    s.flush()
    starts = [c for c in svc.calls if c[0] == "start"]
    finishes = [c for c in svc.calls if c[0] == "finish"]
    assert len(starts) == len(finishes) == 5
    assert {wid for _, (wid, *_rest) in starts} == {wid for _, wid in finishes}
    for _, (wid, _user, corr, cfg) in starts:
        conv = wid.split("#")[0]
        assert corr == f"r{conv[1:]}" and cfg == {"workflow_name": "t"}
        updates = [args for kind, args in svc.calls if kind == "update" and args[0] == wid]
        tokens = [u[1] for u in updates if u[1]]
        assert len(tokens) == 2 and all(list(t) == ["chatter.local"] for t in tokens)
        assert [u[2] for u in updates if u[2]] == [1]
        # each run's events come between its own start and finish
        idx = [i for i, c in enumerate(svc.calls) if c[0] in ("start", "finish") and
               (c[1] == wid or c[1][0] == wid)]  # fmt: skip
        assert len(idx) == 2
    llm = [m for kind, m in svc.calls if kind == "llm"]
    assert len(llm) == 10
    assert {m.correlation_id for m in llm} == {f"r{i}" for i in range(5)}
    assert all(m.provider == "chatter.local" and m.model == "chatter-local-1" for m in llm)
    assert all(m.cost_estimate and m.cost_estimate > 0 for m in llm)


class Misbehaving(Recording):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.release = threading.Event()

    def record_llm_operation(self, m: LLMMetrics) -> None:
        if self.mode == "raise":
            raise RuntimeError("monitoring backend down")
        if self.mode == "slow":
            time.sleep(0.05)
        if self.mode == "block":
            self.release.wait(30)
        super().record_llm_operation(m)


@pytest.mark.parametrize("mode", ["raise", "slow", "block"])
async def test_a_bad_service_never_reaches_the_app(setup: Any, mode: str, caplog: Any) -> None:
    svc = Misbehaving(mode)
    s = setup(monitoring=svc)
    graph = build_chat_graph()
    for _ in range(3):
        out = await graph.ainvoke(Q)
        assert out["messages"][-1].content.startswith("Here is what I found")
    llm_calls = lambda: len([c for c in svc.calls if c[0] == "llm"])  # noqa: E731
    if mode == "block":
        # The runs finished while the service was stuck in its first call: nothing waited.
        assert llm_calls() == 0
        svc.release.set()
    assert s.tel.force_flush() and s.provider.force_flush()
    deadline = time.monotonic() + 10
    while mode != "raise" and llm_calls() < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    if mode == "raise":
        assert "monitoring sink raised" in caplog.text and llm_calls() == 0
    else:
        assert llm_calls() == 6


async def test_analytics_and_metrics_equal_the_spans(setup: Any) -> None:
    pushed: list[Any] = []
    s = setup(record_completion=pushed.append)
    assert isinstance(s.tel.analytics, LiveAnalytics)
    await _runs()
    s.flush()
    chats = s.chats()
    snap = s.tel.analytics.snapshot()
    model = snap["model"]["chatter-local-1"]
    assert model["calls"] == len(chats) == 6
    assert model["errors"] == 0
    assert model["input_tokens"] == sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats)
    assert model["output_tokens"] == sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats)
    assert model["cost"] == pytest.approx(
        sum(c.attributes["gen_ai.usage.cost.amount"] for c in chats)
    )
    assert (
        0 < model["latency_ms"]["p50"] <= model["latency_ms"]["p95"] <= model["latency_ms"]["p99"]
    )
    assert model["ttfc_ms"]["p50"] > 0  # the streamed run's calls
    assert snap["user"]["u1"]["calls"] == 4 and snap["user"]["u2"]["calls"] == 2
    assert set(snap["conversation"]) == {"c-sync", "c-async", "c-stream"}
    assert s.tel.analytics.snapshot(now=time.time() + 3600)["model"] == {}  # window passed
    assert len(pushed) == 6 and {p.trace_id for p in pushed} == {
        format(c.context.trace_id, "032x") for c in chats
    }

    m = s.metrics()
    tokens = m["gen_ai.client.token.usage"]
    by_type = {p.attributes["gen_ai.token.type"]: p for p in tokens}
    assert by_type["input"].sum == model["input_tokens"]
    assert by_type["output"].sum == model["output_tokens"]
    assert list(by_type["input"].explicit_bounds) == TOKEN_BUCKETS
    (duration,) = m["gen_ai.client.operation.duration"]
    assert duration.count == 6 and list(duration.explicit_bounds) == DURATION_BUCKETS
    assert duration.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "chatter.local",
        "gen_ai.request.model": "chatter-local-1",
        "gen_ai.response.model": "chatter-local-1",
    }
    (ttfc,) = m["gen_ai.client.operation.time_to_first_chunk"]
    assert ttfc.count == 2  # only the streamed run's two calls
    (cost,) = m["chatter.gen_ai.cost"]
    assert cost.value == pytest.approx(model["cost"])


def test_each_can_be_switched_off(setup: Any) -> None:
    s = setup(events=False, monitoring=False, analytics=False)
    assert (s.tel.events, s.tel.monitoring, s.tel.analytics) == (None, None, None)
    build_chat_graph().invoke(Q)
    assert "gen_ai.client.token.usage" in s.metrics()  # the metrics stay on


def test_reconfiguring_a_provider_leaves_no_worker_threads_behind() -> None:
    import threading as th

    provider = TracerProvider()

    def workers() -> int:
        return sum(t.name.startswith("chatter-otel-") and t.is_alive() for t in th.enumerate())

    before = workers()
    for _ in range(5):
        tel = configure(tracer_provider=provider, record_completion=lambda c: None)
        build_chat_graph().invoke(Q)
        tel.shutdown()
    deadline = time.monotonic() + 5
    while workers() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert workers() == before


async def test_run_tool_and_chunk_metrics_equal_the_spans(setup: Any) -> None:
    """util-genai's run metrics: a duration per workflow, agent and tool span, by name, with
    error.type on failures and its bucket advisories; time per output chunk for streams."""
    from chatter_otel.sinks.metrics import AGENT_BUCKETS, WORKFLOW_BUCKETS

    s = setup()
    await _runs(fail=True)
    build_chat_graph().with_config(metadata={"gen_ai.agent.name": "support"}).invoke(Q)
    s.flush()
    spans = s.exporter.get_finished_spans()
    m = s.metrics()

    def by(points: list[Any], key: str) -> dict[tuple[Any, Any], Any]:
        return {(p.attributes[key], p.attributes.get("error.type")): p for p in points}

    workflows = by(m["gen_ai.invoke_workflow.duration"], "gen_ai.workflow.name")
    want: dict[tuple[Any, Any], list[float]] = {}
    for sp in spans:
        if sp.name.startswith("invoke_workflow "):
            key = (sp.name.removeprefix("invoke_workflow "),
                   sp.attributes.get("error.type"))  # fmt: skip
            want.setdefault(key, []).append((sp.end_time - sp.start_time) / 1e9)
    assert set(workflows) == set(want) and ("failing", "RuntimeError") in want
    for key, durations in want.items():
        assert workflows[key].count == len(durations)
        assert workflows[key].sum == pytest.approx(sum(durations), rel=1e-6)
        assert list(workflows[key].explicit_bounds) == WORKFLOW_BUCKETS
        assert workflows[key].attributes["gen_ai.operation.name"] == "invoke_workflow"
    (agent,) = m["gen_ai.invoke_agent.duration"]
    (agent_span,) = [sp for sp in spans if sp.name == "invoke_agent support"]
    assert agent.attributes == {"gen_ai.operation.name": "invoke_agent",
                                "gen_ai.agent.name": "support"}  # fmt: skip
    assert agent.count == 1 and list(agent.explicit_bounds) == AGENT_BUCKETS
    assert agent.sum == pytest.approx((agent_span.end_time - agent_span.start_time) / 1e9)
    (tool,) = m["gen_ai.execute_tool.duration"]
    tools = [sp for sp in spans if sp.name.startswith("execute_tool ")]
    assert tool.attributes == {"gen_ai.operation.name": "execute_tool",
                               "gen_ai.tool.name": "get_weather"}  # fmt: skip
    assert tool.count == len(tools) == 5 and list(tool.explicit_bounds) == DURATION_BUCKETS
    # streamed calls: the gaps between their chunks, within each streamed call's duration
    (chunks,) = m["gen_ai.client.operation.time_per_output_chunk"]
    streamed = [c for c in s.chats() if "gen_ai.response.time_to_first_chunk" in c.attributes]
    assert len(streamed) == 2 and chunks.count >= 2
    assert 0 < chunks.sum <= sum((c.end_time - c.start_time) / 1e9 for c in streamed)
    assert list(chunks.explicit_bounds) == DURATION_BUCKETS
