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
from chatter_otel.sinks.forward import AppEventForwarder, app_event_converter
from chatter_otel.sinks.sse import sse_response

__all__ = [
    "AppEventForwarder",
    "EventBus",
    "EventCategory",
    "EventSpanProcessor",
    "Forwarder",
    "Subscription",
    "UnifiedEvent",
    "app_event_converter",
    "sse_response",
]
