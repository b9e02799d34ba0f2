"""The app's own MonitoringService, fed in the app's own types: its metrics class, float costs
it can add, float timestamps it can compare."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider

import chatter_otel
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
        tracer_provider=TracerProvider(), monitoring=service,
        monitoring_llm_metrics=AppLLMMetrics, monitoring_timestamps="epoch",
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
