"""The event the sinks publish: ``UnifiedEvent`` in the app's event shape, and its categories.
Read one back from its ``to_dict()`` form with ``sinks.validation.event_from_dict`` (validated)."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = ["EventCategory", "UnifiedEvent"]


class EventCategory(StrEnum):
    WORKFLOW = "workflow"
    MONITORING = "monitoring"
    ANALYTICS = "analytics"
    STREAMING = "streaming"


@dataclass(frozen=True)
class UnifiedEvent:
    """One event, in the app's event shape."""

    category: EventCategory
    event_type: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    correlation_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    conversation_id: str | None = None
    user_id: str | None = None
    workflow_id: str | None = None
    priority: str = "normal"
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["category"] = self.category.value
        d["timestamp"] = self.timestamp.isoformat()
        return d
