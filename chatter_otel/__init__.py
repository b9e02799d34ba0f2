"""chatter-otel: OpenTelemetry GenAI instrumentation for LangGraph and LangChain chat backends."""

from __future__ import annotations

from chatter_otel.export.store import LocalTraceStore
from chatter_otel.instrumentation.instrumentor import LangGraphInstrumentor
from chatter_otel.instrumentation.runs import RunIds, RunUsage, WorkflowRun, last_run
from chatter_otel.instrumentation.workflow import track_workflow
from chatter_otel.telemetry import Telemetry, configure
from chatter_otel.version import __version__

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
