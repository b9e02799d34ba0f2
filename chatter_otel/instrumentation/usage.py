"""Token usage and response facts from every shape a LangChain chat model reports them in.

Sources, first found wins for the token counts:

1. ``AIMessage.usage_metadata`` (LangChain's normalized form, also merged over streamed chunks),
2. ``response_metadata["token_usage"]`` (OpenAI style) or ``response_metadata["usage"]``
   (Anthropic style),
3. ``LLMResult.llm_output["token_usage"]`` / ``["usage"]``.

Counts are validated: ``None`` means not reported; strings, bools, floats with a fraction,
negatives and values above ``MAX_TOKENS`` are dropped with one rate-limited warning. Nothing is
ever invented: a call with no valid count has ``TokenUsage.reported == False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from chatter_otel._safety import warn_once

MAX_TOKENS = 10**10  # far above any context window; larger is a corrupt value, not usage
_MAX_COST = Decimal(10**6)


@dataclass(slots=True)
class TokenUsage:
    """Token counts of one LLM call; ``None`` where the provider did not report a value."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_output_tokens: int | None = None
    provider_cost: Decimal | None = None

    @property
    def reported(self) -> bool:
        """Any count came back (a provider may report a total alone)."""
        return (
            self.input_tokens is not None
            or self.output_tokens is not None
            or self.total_tokens is not None
        )

    @property
    def priceable(self) -> bool:
        """Input or output counts came back: what a per-token price needs."""
        return self.input_tokens is not None or self.output_tokens is not None


@dataclass(slots=True)
class ResponseInfo:
    """What the response says about itself, besides usage."""

    usage: TokenUsage
    model: str | None = None
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()


def _count(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value  # the common case, checked first
    if isinstance(value, bool) or not isinstance(value, int | float):
        warn_once(
            f"usage:type:{field}",
            "chatter-otel: ignoring malformed token count %s=%.80r (%s)",
            field,
            value,
            type(value).__name__,
        )
        return None
    if isinstance(value, float):
        if not value.is_integer():
            warn_once(
                f"usage:frac:{field}", "chatter-otel: ignoring fractional %s=%r", field, value
            )
            return None
        value = int(value)
    if value < 0 or value > MAX_TOKENS:
        warn_once(f"usage:range:{field}", "chatter-otel: ignoring out-of-range %s=%r", field, value)
        return None
    return int(value)


def _cost(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        cost = Decimal(str(value)) if isinstance(value, int | float | str) else None
    except InvalidOperation:
        cost = None
    if cost is None or not cost.is_finite() or cost < 0 or cost > _MAX_COST:
        warn_once("usage:cost", "chatter-otel: ignoring malformed provider cost %.80r", value)
        return None
    return cost


def _is_map(value: Any) -> bool:
    # dict first: the ABC check behind isinstance(x, Mapping) is slow on the hot path.
    return type(value) is dict or isinstance(value, Mapping)


_EMPTY: Mapping[str, Any] = {}


def _sub(mapping: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = mapping.get(key)
    return value if value is not None and _is_map(value) else _EMPTY


def _from_usage_metadata(um: Mapping[str, Any]) -> TokenUsage:
    inp, out = _sub(um, "input_token_details"), _sub(um, "output_token_details")
    return TokenUsage(
        input_tokens=_count(um.get("input_tokens"), "input_tokens"),
        output_tokens=_count(um.get("output_tokens"), "output_tokens"),
        total_tokens=_count(um.get("total_tokens"), "total_tokens"),
        cache_read_input_tokens=_count(inp.get("cache_read"), "cache_read"),
        cache_creation_input_tokens=_count(inp.get("cache_creation"), "cache_creation"),
        reasoning_output_tokens=_count(out.get("reasoning"), "reasoning"),
    )


def _from_openai(tu: Mapping[str, Any]) -> TokenUsage:
    # OpenAI's prompt_tokens already include the cached ones.
    prompt, completion = _sub(tu, "prompt_tokens_details"), _sub(tu, "completion_tokens_details")
    return TokenUsage(
        input_tokens=_count(tu.get("prompt_tokens"), "prompt_tokens"),
        output_tokens=_count(tu.get("completion_tokens"), "completion_tokens"),
        total_tokens=_count(tu.get("total_tokens"), "total_tokens"),
        cache_read_input_tokens=_count(prompt.get("cached_tokens"), "cached_tokens"),
        reasoning_output_tokens=_count(completion.get("reasoning_tokens"), "reasoning_tokens"),
        provider_cost=_cost(tu.get("cost")),
    )


def _from_anthropic(u: Mapping[str, Any]) -> TokenUsage:
    # Anthropic's input_tokens exclude cache reads and writes; the GenAI conventions count
    # them in gen_ai.usage.input_tokens, so they are added back.
    base = _count(u.get("input_tokens"), "input_tokens")
    read = _count(u.get("cache_read_input_tokens"), "cache_read_input_tokens")
    created = _count(u.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    total_in = None if base is None else base + (read or 0) + (created or 0)
    return TokenUsage(
        input_tokens=total_in,
        output_tokens=_count(u.get("output_tokens"), "output_tokens"),
        cache_read_input_tokens=read,
        cache_creation_input_tokens=created,
        provider_cost=_cost(u.get("cost")),
    )


def _from_mapping(m: Mapping[str, Any]) -> TokenUsage | None:
    tu = m.get("token_usage")
    if tu is not None and _is_map(tu):
        return _from_openai(tu)
    u = m.get("usage")
    if u is not None and _is_map(u):
        return _from_openai(u) if "prompt_tokens" in u else _from_anthropic(u)
    return None


def _finalize(usage: TokenUsage) -> TokenUsage:
    """The one rule for a call's total (docs/decisions.md, "Totals"): the provider's own total
    when it reports one (it may count tokens that are in neither input nor output), else input +
    output when either is reported, else unknown. Every total downstream (run, message, ledger,
    conversation) is a sum of these."""
    if usage.total_tokens is None and usage.priceable:
        usage.total_tokens = (usage.input_tokens or 0) + (usage.output_tokens or 0)
    return usage


def extract_usage(message: Any, llm_output: Mapping[str, Any] | None) -> TokenUsage:
    """Usage of one call from its (first) message and the result's ``llm_output``."""
    candidates: list[TokenUsage] = []
    um = getattr(message, "usage_metadata", None)
    if um is not None and _is_map(um):
        candidates.append(_from_usage_metadata(um))
    rm = getattr(message, "response_metadata", None)
    if rm and _is_map(rm) and (u := _from_mapping(rm)) is not None:
        candidates.append(u)
    if llm_output and (u := _from_mapping(llm_output)) is not None:
        candidates.append(u)
    if not candidates:
        return TokenUsage()
    best = next(
        (c for c in candidates if c.priceable),
        next((c for c in candidates if c.reported), candidates[0]),
    )
    # A provider cost may sit beside normalized usage_metadata in the raw payload.
    if best.provider_cost is None:
        best.provider_cost = next(
            (c.provider_cost for c in candidates if c.provider_cost is not None), None
        )
    return _finalize(best)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def extract_response(response: Any) -> ResponseInfo:
    """Usage, response model, id and finish reasons from a LangChain ``LLMResult``."""
    generations = getattr(response, "generations", None) or []
    first_batch = generations[0] if generations and isinstance(generations[0], list) else []
    llm_output = getattr(response, "llm_output", None)
    llm_output = llm_output if llm_output and _is_map(llm_output) else None

    message = None
    finish: list[str] = []
    for gen in first_batch:
        msg = getattr(gen, "message", None)
        if message is None:
            message = msg
        rm = getattr(msg, "response_metadata", None) or _EMPTY
        info = getattr(gen, "generation_info", None) or _EMPTY
        if not _is_map(rm):
            rm = _EMPTY
        if not _is_map(info):
            info = _EMPTY
        reason = _str(rm.get("finish_reason")) or _str(rm.get("stop_reason"))
        reason = reason or _str(info.get("finish_reason"))
        if reason:
            finish.append(reason)

    rm = getattr(message, "response_metadata", None) or _EMPTY
    if not _is_map(rm):
        rm = _EMPTY
    model = _str(rm.get("model_name")) or _str(rm.get("model"))
    if model is None and llm_output:
        model = _str(llm_output.get("model_name")) or _str(llm_output.get("model"))
    response_id = _str(rm.get("id"))
    if response_id is None:
        msg_id = _str(getattr(message, "id", None))
        # LangChain fills in its own run-derived ids when the provider sent none.
        if msg_id and not msg_id.startswith(("run-", "lc_run-", "lc_")):
            response_id = msg_id
    return ResponseInfo(
        usage=extract_usage(message, llm_output),
        model=model,
        response_id=response_id,
        finish_reasons=tuple(finish),
    )
