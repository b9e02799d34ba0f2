"""Lifecycle events: ``UnifiedEvent``, the in-process ``EventBus``, SSE.

The public import path; the code lives in ``chatter_otel.sinks.events``.
"""

from chatter_otel.sinks.events import (
    EventBus,
    EventCategory,
    EventSpanProcessor,
    Forwarder,
    Subscription,
    UnifiedEvent,
)
from chatter_otel.sinks.sse import sse_response

__all__ = [
    "EventBus",
    "EventCategory",
    "EventSpanProcessor",
    "Forwarder",
    "Subscription",
    "UnifiedEvent",
    "sse_response",
]
