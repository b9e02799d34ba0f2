"""The app's own MonitoringService, fed in the app's own types: its metrics class, float costs
it can add, float timestamps it can compare."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider

import chatter_otel
import chatter_otel.sinks.forward
from chatter_otel import EventOptions, MonitoringOptions
from chatter_otel.reference.demo import build_chat_graph


@dataclass
class AppLLMMetrics:  # the host app's own class: no correlation field, float timestamp
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    duration_ms: float
    cost_estimate: float
    timestamp: float = field(default_factory=time.time)


class AppMonitoring:
    """Shaped like the host backend's service: sums float costs, compares float timestamps."""

    def __init__(self) -> None:
        self.ops: list[AppLLMMetrics] = []
        self.total_cost = 0.0
        self.workflows: dict[str, dict[str, Any]] = {}

    def start_workflow_tracking(self, user_id: str, conversation_id: str, provider_name: str = "",
                                model_name: str = "", workflow_config: Any = None,
                                correlation_id: str = "") -> str:  # fmt: skip
        wid = f"w{len(self.workflows)}"
        self.workflows[wid] = {"start": time.time(), "tokens": 0}
        return wid

    def update_workflow_metrics(self, workflow_id: str, token_usage: Any = None,
                                tool_calls: Any = None, **kw: Any) -> None:  # fmt: skip
        self.workflows[workflow_id]["tokens"] += sum((token_usage or {}).values())

    def finish_workflow_tracking(self, workflow_id: str) -> None:
        self.workflows[workflow_id]["end"] = time.time()

    def record_llm_operation(self, metrics: AppLLMMetrics) -> None:
        assert isinstance(metrics, AppLLMMetrics)
        self.total_cost += metrics.cost_estimate  # a float, never None
        self.ops.append(metrics)

    def get_system_health(self) -> dict[str, Any]:
        cutoff = time.time() - 300
        recent = [m for m in self.ops if m.timestamp > cutoff]  # float timestamps compare
        return {"calls": len(recent), "cost": self.total_cost}


def test_the_app_s_service_in_its_own_types() -> None:
    service = AppMonitoring()
    tel = chatter_otel.configure(
        tracer_provider=TracerProvider(),
        monitoring=MonitoringOptions(service, llm_metrics=AppLLMMetrics, timestamps="epoch"),
        prices={},  # no price for the local model: cost unknown
    )  # fmt: skip
    try:
        build_chat_graph().invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
        assert tel.force_flush()
        assert len(service.ops) == 2
        assert all(isinstance(m.timestamp, float) for m in service.ops)
        assert all(m.cost_estimate == 0.0 for m in service.ops)  # unknown: 0.0 for its sums
        assert service.get_system_health() == {"calls": 2, "cost": 0.0}
        (wf,) = service.workflows.values()
        assert wf["tokens"] == 27 and "end" in wf
    finally:
        tel.shutdown()


class EventPriority(Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


@dataclass
class AppEvent:  # the host app's own event class: session_id, an enum, no trace or span ids
    event_type: str
    session_id: str | None = None
    correlation_id: str | None = None
    priority: EventPriority = EventPriority.NORMAL
    source_system: str = "app"
    data: dict[str, Any] = field(default_factory=dict)


class AppEvents:
    """The app's event manager: it emits its own workflow events too, with 0 tokens."""

    def __init__(self) -> None:
        self.seen: list[AppEvent] = []

    async def emit(self, event: AppEvent) -> None:
        self.seen.append(event)


class AppTracker:
    """The host app's own tracker: records each workflow with empty usage."""

    def __init__(self, monitoring: AppMonitoring, events: AppEvents) -> None:
        self.monitoring, self.events = monitoring, events

    async def run(self, graph: Any, conversation: str) -> None:
        wid = self.monitoring.start_workflow_tracking("u1", conversation)
        await self.events.emit(AppEvent("workflow_started", session_id=conversation))
        await graph.ainvoke({"messages": [HumanMessage("What is the weather in Paris?")]},
                            {"configurable": {"thread_id": conversation}})  # fmt: skip
        self.monitoring.update_workflow_metrics(wid, token_usage={"unknown": 0})
        self.monitoring.finish_workflow_tracking(wid)
        await self.events.emit(AppEvent("workflow_completed", session_id=conversation,
                                        data={"total_tokens": 0}))  # fmt: skip


@pytest.mark.parametrize("mode", ["fill", "parallel"])
async def test_the_app_s_own_workflow_records_are_filled_not_doubled(mode: str) -> None:
    service, events = AppMonitoring(), AppEvents()
    convert = chatter_otel.sinks.forward.app_event_converter(
        AppEvent, field_map={"session_id": "conversation_id"},
        enums={"priority": EventPriority}, constants={"source_system": "chatter-otel"},
    )  # fmt: skip
    tel = chatter_otel.configure(
        tracer_provider=TracerProvider(), monitoring=MonitoringOptions(service, mode=mode),
        events=EventOptions(forward_to=events.emit, converter=convert), prices={},
    )  # fmt: skip
    try:
        tracker = AppTracker(service, events)
        for i in range(3):
            await tracker.run(build_chat_graph(), f"conv-{i}")
        assert tel.force_flush()
        mine = [e for e in events.seen if e.source_system == "app"]
        ours = [e for e in events.seen if e.source_system == "chatter-otel"]
        assert all(isinstance(e.priority, EventPriority) for e in ours)
        assert {e.event_type for e in ours} >= {"llm_call_completed", "tool_called"}
        completed = [e for e in mine if e.event_type == "workflow_completed"]
        if mode == "fill":
            assert len(service.workflows) == 3  # one entry per run: the app's own
            assert [w["tokens"] for w in service.workflows.values()] == [27, 27, 27]
            assert [e.data["total_tokens"] for e in completed] == [27, 27, 27]  # filled
            assert not [e for e in ours if e.event_type.startswith("workflow_")]
        else:
            assert len(service.workflows) == 6  # the app's (empty) and ours, side by side
            assert sorted(w["tokens"] for w in service.workflows.values()) == [0, 0, 0, 27, 27, 27]
            assert [e.data["total_tokens"] for e in completed] == [0, 0, 0]
            assert len([e for e in ours if e.event_type == "workflow_completed"]) == 3
    finally:
        tel.shutdown()
