"""Configuration, resolved once: keyword argument > environment variable > default.

A bad value logs one warning naming the variable and falls back to the default; it never raises.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chatter_otel.instrumentation.estimate import Estimator, resolve_estimator
from chatter_otel.instrumentation.semconv_modes import DEFAULT, SemconvMode, resolve_mode

_log = logging.getLogger("chatter_otel")

ENV_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENV_MAX_CONTENT_LENGTH = "CHATTER_OTEL_MAX_CONTENT_LENGTH"
ENV_CAPTURE_EXCEPTION_TEXT = "CHATTER_OTEL_CAPTURE_EXCEPTION_TEXT"
ENV_STREAM_USAGE = "CHATTER_OTEL_STREAM_USAGE"
ENV_ESTIMATE_USAGE = "CHATTER_OTEL_ESTIMATE_USAGE"
ENV_MAX_RUNS = "CHATTER_OTEL_MAX_RUNS"
ENV_MAX_RUN_AGE = "CHATTER_OTEL_MAX_RUN_AGE_SECONDS"
ENV_PRICES_FILE = "CHATTER_OTEL_PRICES_FILE"

ENV_EMIT_EVENT = "OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT"

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})
# OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT as opentelemetry-util-genai reads it (its
# modes), plus the boolean spellings: (content on spans, content in events).
_CONTENT_MODES = {
    "span_only": (True, False), "event_only": (False, True), "span_and_event": (True, True),
    "no_content": (False, False), **dict.fromkeys(_TRUE, (True, False)),
    **dict.fromkeys(_FALSE, (False, False)),
}  # fmt: skip


def resolve_content(kwarg: bool | str | None) -> tuple[bool, bool]:
    """Where message content goes: (on spans, in ``gen_ai.client.inference.operation.details``
    events). ``capture_content=`` (a bool, or a mode name) > the environment > neither."""
    raw: object = kwarg if kwarg is not None else os.environ.get(ENV_CAPTURE_CONTENT)
    if raw is None:
        return False, False
    if isinstance(raw, bool):
        return raw, False
    mode = _CONTENT_MODES.get(str(raw).strip().lower())
    if mode is None:
        _warn(ENV_CAPTURE_CONTENT, raw, "NO_CONTENT", "expected SPAN_ONLY, EVENT_ONLY, "
              "SPAN_AND_EVENT, NO_CONTENT, true or false")  # fmt: skip
        return False, False
    return mode


Redactor = Callable[[str, Any], Any]
"""``redact(kind, value) -> value``: ``kind`` is ``input``, ``output``, ``tool.arguments`` or
``tool.result``; ``value`` the JSON-ready structure about to be recorded."""


def _warn(name: str, raw: object, default: object, why: str) -> None:
    _log.warning("chatter-otel: ignoring %s=%r (%s); using %r", name, raw, why, default)


def resolve_bool(name: str, kwarg: bool | None, default: bool) -> bool:
    if kwarg is not None:
        return bool(kwarg)
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    _warn(name, raw, default, "expected true or false")
    return default


def resolve_int(name: str, kwarg: int | None, default: int, *, minimum: int = 1) -> int:
    raw: object = kwarg if kwarg is not None else os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        _warn(name, raw, default, "not an integer")
        return default
    if value < minimum:
        _warn(name, raw, default, f"must be >= {minimum}")
        return default
    return int(value)


def exception_text_captured(
    capture_content: bool | str | None = None, capture_exception_text: bool | None = None
) -> bool:
    """Whether exception messages may leave the process: ``capture_exception_text`` (kwarg >
    ``CHATTER_OTEL_CAPTURE_EXCEPTION_TEXT``), defaulting to content capture."""
    on_spans, in_events = resolve_content(capture_content)
    return resolve_bool(ENV_CAPTURE_EXCEPTION_TEXT, capture_exception_text, on_spans or in_events)


def _load_prices_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        _warn(ENV_PRICES_FILE, path, {}, f"cannot read a JSON object: {exc}")
        return {}
    if not isinstance(data, dict):
        _warn(ENV_PRICES_FILE, path, {}, "the file must hold a JSON object")
        return {}
    return data


@dataclass(frozen=True)
class Settings:
    """What the instrumentation needs to know, resolved once at ``instrument()``."""

    capture_content: bool = False  # message content on spans
    # Message content in gen_ai.client.inference.operation.details events (the Logs API), and
    # whether those events are emitted at all (OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT, else
    # when content goes to events), as opentelemetry-util-genai decides both.
    event_content: bool = False
    emit_events: bool = False
    # The text of the app's exceptions (message, stack trace) on spans and events: it can hold
    # prompt or argument text, so it follows capture_content unless set on its own.
    capture_exception_text: bool = False
    max_content_length: int = 16_384
    redact: Redactor | None = None
    max_runs: int = 10_000
    max_run_age_s: int = 3_600
    prices: Mapping[str, Any] = field(default_factory=dict)
    # Ask OpenAI-compatible chat models (langchain-openai) for usage on streamed calls, where
    # the app left ``stream_usage`` unset: without it a streamed call reports no tokens.
    stream_usage: bool = False
    # Counts tokens of calls that report none (instrumentation/estimate.py); None: never.
    estimator: Estimator | None = None
    # Which GenAI convention names spans carry (OTEL_SEMCONV_STABILITY_OPT_IN; semconv_modes).
    semconv: SemconvMode = field(default_factory=lambda: SemconvMode(DEFAULT))

    @classmethod
    def resolve(
        cls,
        *,
        capture_content: bool | str | None = None,
        capture_exception_text: bool | None = None,
        max_content_length: int | None = None,
        redact: Redactor | None = None,
        max_runs: int | None = None,
        max_run_age_s: int | None = None,
        prices: Mapping[str, Any] | None = None,
        stream_usage: bool | None = None,
        estimate_usage: bool | Callable[[str], int] | None = None,
        semconv_opt_in: str | None = None,
    ) -> Settings:
        if redact is not None and not callable(redact):
            _warn("redact", redact, None, "not callable")
            redact = None
        if prices is None:
            path = os.environ.get(ENV_PRICES_FILE)
            prices = _load_prices_file(path) if path else {}
        on_spans, in_events = resolve_content(capture_content)
        return cls(
            capture_content=on_spans,
            event_content=in_events,
            emit_events=resolve_bool(ENV_EMIT_EVENT, None, in_events),
            capture_exception_text=exception_text_captured(capture_content, capture_exception_text),
            max_content_length=resolve_int(
                ENV_MAX_CONTENT_LENGTH, max_content_length, 16_384, minimum=64
            ),
            redact=redact,
            max_runs=resolve_int(ENV_MAX_RUNS, max_runs, 10_000, minimum=16),
            max_run_age_s=resolve_int(ENV_MAX_RUN_AGE, max_run_age_s, 3_600),
            prices=dict(prices),
            stream_usage=resolve_bool(ENV_STREAM_USAGE, stream_usage, False),
            estimator=resolve_estimator(
                estimate_usage
                if estimate_usage is not None
                else resolve_bool(ENV_ESTIMATE_USAGE, None, False)
            ),
            semconv=resolve_mode(semconv_opt_in),
        )
