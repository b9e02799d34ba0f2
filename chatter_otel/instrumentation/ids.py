"""The app ids a run belongs to, from where they enter: a graph's config, ``track_workflow``,
the surrounding run, the request's correlation id."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from chatter_otel._safety import warn_once
from chatter_otel.correlation import (
    current_correlation_id,
    is_valid_app_id,
    valid_correlation_id,
)
from chatter_otel.instrumentation.runs import EMPTY_IDS, RunIds, current_workflow

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ambient_ids", "clean_id", "ids_from_config"]

_MAX_ID_LEN = 256


def clean_id(value: Any) -> str | None:
    if (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, UUID):
        value = str(value)
    if not isinstance(value, str) or not value:
        return None
    if not is_valid_app_id(value):
        warn_once("ids:invalid", "chatter-otel: ignoring an app id of %d chars: 1-%d printable "
                  "characters without white space, quotes, backslashes, <> or control and bidi "
                  "characters are allowed", len(value), _MAX_ID_LEN)  # fmt: skip
        return None
    return value


def ids_from_config(config: Mapping[str, Any] | None) -> RunIds:
    """App ids from a LangGraph config: ``metadata`` first, then ``configurable``.

    ``conversation_id`` falls back to LangGraph's ``thread_id``.
    """
    if not config:
        return EMPTY_IDS
    md = config.get("metadata") or {}
    conf = config.get("configurable") or {}

    def pick(*keys: str) -> str | None:
        for source in (md, conf):
            for key in keys:
                if (value := clean_id(source.get(key))) is not None:
                    return value
        return None

    ids = RunIds(
        conversation_id=pick("conversation_id", "thread_id"),
        message_id=pick("message_id"),
        user_id=pick("user_id"),
        correlation_id=valid_correlation_id(pick("correlation_id"), "a graph's config"),
    )
    if any((ids.conversation_id, ids.message_id, ids.user_id, ids.correlation_id)):
        return ids
    return EMPTY_IDS


def ambient_ids(ids: RunIds) -> RunIds:
    """``ids`` over the enclosing ``track_workflow``'s, with the correlation id from baggage."""
    outer = current_workflow.get()
    ids = ids.merged_over(outer.ids if outer is not None else None)
    if ids.correlation_id is None:
        corr = current_correlation_id()  # the app's own id first, then ours, then baggage
        if corr is not None:
            ids = RunIds(ids.conversation_id, ids.message_id, ids.user_id, corr)
    return ids
