"""Prompt, completion and tool content as GenAI JSON attributes: opt-in, redacted, size-capped.

Messages follow the conventions' ``gen_ai.input.messages`` / ``gen_ai.output.messages`` shape
(``[{"role", "parts": [{"type": "text", "content"}, {"type": "tool_call", ...}]}]``). Over-long
values are cut inside the structure (long strings first, then trailing list items), so the
attribute always stays valid JSON. The redaction hook sees the structure before it is
serialized; if it raises, the content is dropped, never recorded unredacted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatter_otel._safety import warn_once

if TYPE_CHECKING:
    from chatter_otel.instrumentation.settings import Settings

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
_MARK = "…[truncated {} chars]"
_DROPPED = '"[content dropped: redaction failed]"'


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts: list[dict[str, Any]] = []
    if isinstance(content, Sequence):
        for block in content:
            if isinstance(block, str):
                parts.append({"type": "text", "content": block})
            elif isinstance(block, Mapping) and block.get("type") == "text":
                parts.append({"type": "text", "content": str(block.get("text", ""))})
            elif isinstance(block, Mapping):
                parts.append({"type": str(block.get("type", "unknown"))})
    return parts


def message_json(message: Any) -> dict[str, Any]:
    """One LangChain message in the GenAI message shape."""
    role = _ROLES.get(getattr(message, "type", ""), getattr(message, "type", "unknown"))
    parts = _text_parts(getattr(message, "content", None))
    for call in getattr(message, "tool_calls", None) or ():
        parts.append(
            {
                "type": "tool_call",
                "id": call.get("id"),
                "name": call.get("name"),
                "arguments": call.get("args"),
            }
        )
    if role == "tool":
        parts = [
            {
                "type": "tool_call_response",
                "id": getattr(message, "tool_call_id", None),
                "response": getattr(message, "content", None),
            }
        ]
    return {"role": role, "parts": parts}


def _shrink(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + _MARK.format(len(value) - limit)
    if isinstance(value, Mapping):
        return {str(k): _shrink(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shrink(v, limit) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def fit_json(value: Any, max_len: int) -> str:
    """Serialize ``value`` as JSON of at most ``max_len`` characters, cutting inside it."""
    text = _dumps(value)
    limit = max_len
    while len(text) > max_len and limit > 16:
        limit //= 2
        text = _dumps(_shrink(value, limit))
    if len(text) > max_len and isinstance(value, list):
        # Too many items even with short strings: keep a prefix and say how many were cut.
        items = list(_shrink(value, 16))
        total = len(items)
        while items and len(text) > max_len:
            items.pop()
            text = _dumps([*items, {"truncated_items": total - len(items)}])
    if len(text) > max_len:
        text = _dumps(_MARK.format(len(text)))
    return text


def render(settings: Settings, kind: str, value: Any) -> str:
    """Redact (when a hook is set), then serialize within the size cap."""
    if settings.redact is not None:
        try:
            value = settings.redact(kind, value)
        except Exception:
            warn_once(
                "content:redact",
                "chatter-otel: redaction hook raised; content dropped",
                exc_info=True,
            )
            return _DROPPED
    return fit_json(value, settings.max_content_length)
