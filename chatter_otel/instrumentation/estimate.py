"""Opt-in token estimates for calls that came back without usage.

A streamed call to a provider that was not asked for usage (OpenAI's
``stream_options.include_usage``) reports no tokens, and by default the call is recorded as
missing, never as 0. With ``estimate_usage`` on (``CHATTER_OTEL_ESTIMATE_USAGE=true``), a call
that ended without an error and without usage gets counts estimated here from the messages it
sent and the text it received. An estimate is never mixed silently with measured numbers: the
call span carries ``chatter.usage.estimated=true`` and ``chatter.usage.estimator``, its ledger
row ``usage_estimated``, its token metric points ``chatter.usage.estimated``, and a run that
includes one says so on its span (``chatter.usage.estimated``) and in ``RunUsage``.

The counter, resolved once at ``instrument()``:

* ``estimate_usage=True``: tiktoken's ``o200k_base`` encoding (the GPT-4o family's) when
  tiktoken is installed and the encoding loads. tiktoken downloads it on first use; a host
  without internet access points ``TIKTOKEN_CACHE_DIR`` at a copy. When it cannot load, one log
  line says why, and the estimate falls back to 4 characters per token (OpenAI's rule of thumb
  for English text), named ``chars/4``.
* ``estimate_usage=<callable>``: the app's own ``count(text) -> int`` (a model's tokenizer),
  named ``custom``; one that raises or returns a non-count leaves the call missing, counted in
  the log once.

Message framing follows OpenAI's published count for chat models: 3 tokens per message plus 3
priming the reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.usage import MAX_TOKENS, TokenUsage

__all__ = ["Estimator", "estimate", "resolve_estimator"]

_PER_MESSAGE = 3
_REPLY_PRIMING = 3
_CHARS_PER_TOKEN = 4
TIKTOKEN_ENCODING = "o200k_base"


@dataclass(frozen=True, slots=True)
class Estimator:
    """How tokens are counted: ``name`` goes on the span as ``chatter.usage.estimator``."""

    name: str
    count: Callable[[str], int]


def _by_characters(text: str) -> int:
    return -(-len(text) // _CHARS_PER_TOKEN)


CHARACTERS = Estimator("chars/4", _by_characters)


def _tiktoken() -> Estimator | None:
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        encoding = tiktoken.get_encoding(TIKTOKEN_ENCODING)
    except Exception as exc:  # tiktoken fetches the file: offline, it fails here
        warn_once("estimate:tiktoken", "chatter-otel: usage estimates count 4 characters per "
                  "token: tiktoken's %s encoding could not load (%s: %.200s); set "
                  "TIKTOKEN_CACHE_DIR to a folder that holds it", TIKTOKEN_ENCODING,
                  type(exc).__name__, exc)  # fmt: skip
        return None

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return Estimator(f"tiktoken:{TIKTOKEN_ENCODING}", count)


def resolve_estimator(option: Any) -> Estimator | None:
    """``None``/``False``: no estimates; ``True``: tiktoken, else characters; a callable: the
    app's counter. Anything else warns and means no estimates."""
    if option is None or option is False:
        return None
    if option is True:
        return _tiktoken() or CHARACTERS
    if callable(option):
        return Estimator("custom", option)
    warn_once("estimate:option", "chatter-otel: ignoring estimate_usage=%.80r (a bool or a "
              "callable count(text) -> int); usage is not estimated", option)  # fmt: skip
    return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks: the text ones count
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "\n".join(parts)
    return "" if content is None else str(content)


def _message_text(message: Any) -> str:
    text = _text(getattr(message, "content", message))
    calls = getattr(message, "tool_calls", None)
    if calls:  # the arguments a model wrote are tokens it produced (or, sent back, reads)
        text += json.dumps([c.get("args") for c in calls if isinstance(c, Mapping)], default=str)
    return text


def _checked(estimator: Estimator, text: str) -> int | None:
    try:
        n = estimator.count(text)
    except Exception as exc:
        warn_once(f"estimate:raise:{estimator.name}", "chatter-otel: the usage estimator %s "
                  "raised %s; the call's usage stays missing", estimator.name,
                  type(exc).__name__)  # fmt: skip
        return None
    if type(n) is not int or not 0 <= n <= MAX_TOKENS:
        warn_once(f"estimate:value:{estimator.name}", "chatter-otel: the usage estimator %s "
                  "returned %.40r, not a token count; the call's usage stays missing",
                  estimator.name, n)  # fmt: skip
        return None
    return n


def estimate(estimator: Estimator, inputs: list[Any] | None, response: Any) -> TokenUsage | None:
    """Input and output tokens of one call: the first prompt (a list of messages, or a string
    for a completion model) and the first generation. ``None`` when the counter fails."""
    batch = inputs[0] if inputs else []
    messages = batch if isinstance(batch, list) else [batch]
    prompt = _REPLY_PRIMING
    for message in messages:
        n = _checked(estimator, _message_text(message))
        if n is None:
            return None
        prompt += n + _PER_MESSAGE
    generations = getattr(response, "generations", None) or [[]]
    first = generations[0][0] if generations and generations[0] else None
    produced = getattr(first, "message", None)
    out_text = _message_text(produced) if produced is not None else getattr(first, "text", "")
    completion = _checked(estimator, out_text or "")
    if completion is None:
        return None
    return TokenUsage(input_tokens=prompt, output_tokens=completion,
                      total_tokens=prompt + completion)  # fmt: skip
