"""The demo: the reference workflow on embedded defaults.

The public import path; the code lives in ``chatter_otel.reference.demo``.
"""

from chatter_otel.reference.demo import (
    ChatState,
    DemoResult,
    build_chat_graph,
    get_weather,
    run_demo,
)

__all__ = [
    "ChatState",
    "DemoResult",
    "build_chat_graph",
    "get_weather",
    "run_demo",
]
