"""chatter-otel: OpenTelemetry GenAI instrumentation for LangGraph and LangChain chat backends."""

from __future__ import annotations

from chatter_otel._runs import RunIds, RunUsage, WorkflowRun, last_run
from chatter_otel.instrumentor import LangGraphInstrumentor
from chatter_otel.store import LocalTraceStore
from chatter_otel.telemetry import Telemetry, configure
from chatter_otel.version import __version__
from chatter_otel.workflow import track_workflow

__all__ = [
    "LangGraphInstrumentor",
    "LocalTraceStore",
    "RunIds",
    "RunUsage",
    "Telemetry",
    "WorkflowRun",
    "__version__",
    "configure",
    "last_run",
    "track_workflow",
]
