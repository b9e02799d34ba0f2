"""chatter-otel: OpenTelemetry GenAI instrumentation for LangGraph and LangChain chat backends.

The names below load on first use (PEP 562), so ``import chatter_otel`` and the
``chatter-otel`` command import nothing of LangChain, LangGraph or the SDK until they need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from chatter_otel.version import __version__

if TYPE_CHECKING:
    from chatter_otel.export.store import LocalTraceStore
    from chatter_otel.instrumentation.instrumentor import LangGraphInstrumentor
    from chatter_otel.instrumentation.runs import RunIds, RunUsage, WorkflowRun, last_run
    from chatter_otel.instrumentation.workflow import track_workflow
    from chatter_otel.options import BudgetOptions, EventOptions, MonitoringOptions
    from chatter_otel.setup import configure
    from chatter_otel.telemetry import Telemetry

__all__ = [
    "BudgetOptions",
    "EventOptions",
    "LangGraphInstrumentor",
    "LocalTraceStore",
    "MonitoringOptions",
    "RunIds",
    "RunUsage",
    "Telemetry",
    "WorkflowRun",
    "__version__",
    "configure",
    "last_run",
    "track_workflow",
]

_WHERE = {
    "BudgetOptions": "chatter_otel.options",
    "EventOptions": "chatter_otel.options",
    "MonitoringOptions": "chatter_otel.options",
    "LocalTraceStore": "chatter_otel.export.store",
    "LangGraphInstrumentor": "chatter_otel.instrumentation.instrumentor",
    "RunIds": "chatter_otel.instrumentation.runs",
    "RunUsage": "chatter_otel.instrumentation.runs",
    "WorkflowRun": "chatter_otel.instrumentation.runs",
    "last_run": "chatter_otel.instrumentation.runs",
    "track_workflow": "chatter_otel.instrumentation.workflow",
    "Telemetry": "chatter_otel.telemetry",
    "configure": "chatter_otel.setup",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'chatter_otel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
