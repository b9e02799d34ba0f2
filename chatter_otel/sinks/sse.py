"""Server-sent events: a bus's lifecycle events streamed to a browser."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from chatter_otel.sinks.validation import checked

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from chatter_otel.sinks.events import EventBus

__all__ = ["sse_response"]


def sse_response(
    bus: EventBus,
    *,
    conversation_id: str | None = None,
    user_id: str | None = None,
    heartbeat_s: float = 15.0,
) -> Any:
    """A Starlette ``StreamingResponse`` of the bus's events as server-sent events.

    ``event: <event_type>`` / ``data: <UnifiedEvent as JSON>``, filtered by conversation or
    user; a comment line every ``heartbeat_s`` keeps proxies from closing an idle stream. The
    subscription ends when the client goes away.
    """
    from starlette.responses import StreamingResponse

    sub = bus.subscribe(conversation_id=conversation_id, user_id=user_id)

    async def stream() -> AsyncIterator[str]:
        try:
            yield ": connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(sub.get(), timeout=heartbeat_s)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if checked(bus, "sse", event) is None:
                    continue  # nothing unchecked reaches an SSE frame
                payload = json.dumps(event.to_dict(), default=str)
                yield f"id: {event.id}\nevent: {event.event_type}\ndata: {payload}\n\n"
        finally:
            sub.close()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
