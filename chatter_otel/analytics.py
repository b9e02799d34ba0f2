"""Live analytics and the GenAI client metrics.

The public import path; the code lives in ``chatter_otel.sinks.analytics``.
"""

from chatter_otel.sinks.analytics import (
    COST_METRIC,
    AnalyticsSpanProcessor,
    LiveAnalytics,
    LLMCompletion,
)

__all__ = [
    "COST_METRIC",
    "AnalyticsSpanProcessor",
    "LLMCompletion",
    "LiveAnalytics",
]
