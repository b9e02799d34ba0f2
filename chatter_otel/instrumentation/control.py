"""LangGraph's control-flow exceptions (an interrupt, a command to the parent graph), which end
a span without an error. Stand-ins where LangGraph is not installed: then nothing raises them,
and ``track_workflow`` still works around plain LangChain code."""

from __future__ import annotations

try:
    from langgraph.errors import GraphBubbleUp, GraphInterrupt
except ImportError:  # pragma: no cover - exercised on an install without the instruments

    class GraphBubbleUp(Exception):  # type: ignore[no-redef]
        """Never raised: LangGraph is not installed."""

    class GraphInterrupt(GraphBubbleUp):  # type: ignore[no-redef]
        """Never raised: LangGraph is not installed."""


__all__ = ["GraphBubbleUp", "GraphInterrupt"]
