"""The app's MonitoringService, driven from the records of our spans.

The public import path; the code lives in ``chatter_otel.sinks.monitoring``.
"""

from chatter_otel.sinks.monitoring import (
    LLMMetrics,
    MonitoringService,
    MonitoringSpanProcessor,
    WorkflowMetrics,
)

__all__ = [
    "LLMMetrics",
    "MonitoringService",
    "MonitoringSpanProcessor",
    "WorkflowMetrics",
]
