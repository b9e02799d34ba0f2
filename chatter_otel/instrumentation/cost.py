"""The cost of one LLM call: provider-reported first, else ``genai-prices``, else none.

The override table (``prices=`` or ``CHATTER_OTEL_PRICES_FILE``) prices custom or self-hosted
models with genai-prices' own ``ModelPrice``, so both paths share one source of prices. Keys are
a model name (``"my-llama"``) or ``"provider:model"`` (``"openai:my-finetune"``); values are
``ModelPrice`` objects or mappings of its per-million-token fields (``input_mtok``,
``output_mtok``, ``cache_read_mtok``, ``cache_write_mtok``, ``output_reasoning_mtok``...). A model
that neither prices has no cost: the attribute is absent, never 0.

Every computed cost names the price table it came from (``gen_ai.usage.cost.price_table`` on
the span, ``price_table`` in the ledger): ``genai-prices <version>`` for its bundled data,
``genai-prices <version>, updated <UTC time>`` for data it fetched since, ``override <digest>``
for the app's table (a digest of its content: a changed table is another name). A cost the
provider reported names none.

Speed: genai-prices' ``calc_price`` walks its unit registry on every call (60-100 µs inside a
graph run). For flat prices, cost is linear in the token counts, so the per-token rates are asked
of genai-prices once per model (by pricing one million tokens of each kind) and each call is then
five multiplications. Tiered and time-of-day prices are not linear: those go through
``calc_price`` on every call. ``tests/test_cost.py`` checks the two agree exactly.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.providers import PRICE_PROVIDER_IDS

if TYPE_CHECKING:
    from chatter_otel.instrumentation.usage import TokenUsage

SOURCE_PROVIDER = "provider"
SOURCE_LOCAL = "local"
CURRENCY = "USD"  # genai-prices quotes USD

_MISS = object()
_CONDITIONAL = object()  # the price depends on the request time: calc_price on each call
_MAX_CACHED_MODELS = 512
_PROBE = 1_000_000


@dataclass(frozen=True, slots=True)
class Cost:
    amount: Decimal
    currency: str
    source: str
    table: str | None = None  # the price table's name and version; None: the provider's cost


def _genai_prices_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genai-prices")
    except PackageNotFoundError:  # pragma: no cover - vendored or renamed
        return "unknown"


def _snapshot_table(snapshot: Any) -> str:
    name = f"genai-prices {_genai_prices_version()}"
    if getattr(snapshot, "from_auto_update", False):
        stamp = getattr(snapshot, "timestamp", None)
        when = stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ") if stamp else "?"
        return f"{name}, updated {when}"
    return name


def _override_table(overrides: Mapping[str, Any]) -> str:
    canon = json.dumps({str(k).lower(): v if isinstance(v, Mapping) else repr(v)
                        for k, v in overrides.items()}, sort_keys=True, default=str)  # fmt: skip
    return "override " + hashlib.sha256(canon.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class _Rates:
    """USD per token of each kind, as genai-prices charges them for one flat-priced model."""

    input: Decimal
    cache_read: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal

    @classmethod
    def of(cls, price: ModelPrice) -> _Rates | ModelPrice:
        """Rates for a flat price; a tiered price is returned as is, to be priced per call."""
        if any(isinstance(v, TieredPrices) for v in vars(price).values()):
            return price

        def per_token(**kw: int) -> Decimal:
            return price.calc_price(Usage(**kw))["total_price"] / _PROBE

        # Cached and reasoning tokens are subsets of input and output tokens in genai-prices,
        # exactly as in the GenAI conventions; a kind without its own price falls back to its
        # parent's, which these probes capture too.
        return cls(
            input=per_token(input_tokens=_PROBE),
            cache_read=per_token(input_tokens=_PROBE, cache_read_tokens=_PROBE),
            cache_write=per_token(input_tokens=_PROBE, cache_write_tokens=_PROBE),
            output=per_token(output_tokens=_PROBE),
            reasoning=per_token(output_tokens=_PROBE, output_reasoning_tokens=_PROBE),
        )

    def total(self, u: TokenUsage) -> Decimal | None:
        read = u.cache_read_input_tokens or 0
        write = u.cache_creation_input_tokens or 0
        reasoning = u.reasoning_output_tokens or 0
        plain_in = (u.input_tokens or 0) - read - write
        plain_out = (u.output_tokens or 0) - reasoning
        if plain_in < 0 or plain_out < 0:
            return None  # inconsistent counts: let genai-prices judge them
        return (
            self.input * plain_in
            + self.cache_read * read
            + self.cache_write * write
            + self.output * plain_out
            + self.reasoning * reasoning
        )


def _model_price(key: str, value: Any) -> ModelPrice | None:
    if isinstance(value, ModelPrice):
        return value
    if not isinstance(value, Mapping):
        warn_once(f"price:{key}", "chatter-otel: price override %r is not a mapping", key)
        return None
    try:
        fields = {k: Decimal(str(v)) for k, v in value.items() if v is not None}
        if any(not d.is_finite() or d < 0 for d in fields.values()):
            raise InvalidOperation
        return ModelPrice(**fields)
    except (InvalidOperation, TypeError, ValueError):
        warn_once(f"price:{key}", "chatter-otel: ignoring invalid price override %r=%r", key, value)
        return None


def _gp_usage(u: TokenUsage) -> Usage:
    return Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_input_tokens,
        cache_write_tokens=u.cache_creation_input_tokens,
        output_reasoning_tokens=u.reasoning_output_tokens,
    )


class Pricer:
    """Prices calls. Memoizes, per (provider, model), how to price it; bounded."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._overrides: dict[str, _Rates | ModelPrice] = {}
        for key, value in (overrides or {}).items():
            mp = _model_price(str(key), value)
            if mp is not None:
                self._overrides[str(key).lower()] = _Rates.of(mp)
        self._table = _override_table(overrides) if self._overrides and overrides else None
        self._known: OrderedDict[tuple[str | None, str], object] = OrderedDict()
        self._snapshot: object = None
        self._snapshot_table = ""
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")

    def cost(
        self, usage: TokenUsage, models: Sequence[str | None], provider: str | None
    ) -> Cost | None:
        """Cost of one call. ``models``: response model first, then the requested one."""
        if usage.provider_cost is not None:
            return Cost(usage.provider_cost, CURRENCY, SOURCE_PROVIDER)
        if not usage.priceable:  # no counts, or a total alone: cannot be priced, never 0
            return None
        for model in models:
            if model:
                how, table = self._how(model, provider)
                if how is not None:
                    return self._apply(how, table, usage, model, provider)
        return None

    def _apply(
        self, how: object, table: str, usage: TokenUsage, model: str, provider: str | None
    ) -> Cost | None:
        try:
            if isinstance(how, _Rates) and (total := how.total(usage)) is not None:
                return Cost(total, CURRENCY, SOURCE_LOCAL, table)
            if isinstance(how, ModelPrice):
                total = how.calc_price(_gp_usage(usage))["total_price"]
                return Cost(total, CURRENCY, SOURCE_LOCAL, table)
            provider_id = PRICE_PROVIDER_IDS.get(provider) if provider else None
            total = calc_price(_gp_usage(usage), model, provider_id=provider_id).total_price
            return Cost(total, CURRENCY, SOURCE_LOCAL, table)
        except (ValueError, LookupError, ArithmeticError) as exc:
            warn_once(
                f"price:fail:{model}"[:200],
                "chatter-otel: cannot price %r with usage %r: %s; cost left unset",
                model, usage, exc,
            )  # fmt: skip
            return None

    def _how(self, model: str, provider: str | None) -> tuple[object | None, str]:
        """How to price ``model`` (rates, a tiered ModelPrice, _CONDITIONAL, or None), and
        the name of the price table that says so."""
        if self._overrides:
            name = model.lower()
            hit = self._overrides.get(f"{provider.lower()}:{name}") if provider else None
            hit = hit or self._overrides.get(name)
            if hit is not None:
                return hit, self._table or "override"
        snapshot = data_snapshot.get_snapshot()
        if snapshot is not self._snapshot:  # genai-prices auto-updated its data
            with self._lock:
                self._known.clear()
                self._snapshot = snapshot
                self._snapshot_table = _snapshot_table(snapshot)
        key = (provider, model)
        how = self._known.get(key, _MISS)
        if how is _MISS:
            how = self._resolve(snapshot, model, provider)
            with self._lock:
                self._known[key] = how
                while len(self._known) > _MAX_CACHED_MODELS:
                    self._known.popitem(last=False)
        return how, self._snapshot_table

    @staticmethod
    def _resolve(snapshot: Any, model: str, provider: str | None) -> object | None:
        provider_id = PRICE_PROVIDER_IDS.get(provider) if provider else None
        try:
            _, info = snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            warn_once(
                f"price:unknown:{provider}:{model}"[:200],
                "chatter-otel: no price known for model %r (provider %r); cost left unset. "
                "Add it to the prices override table to price it.",
                model,
                provider,
            )
            return None
        # price_variants (service tiers) apply only with a price_context, which is never passed.
        if isinstance(info.prices, ModelPrice):
            return _Rates.of(info.prices)
        return _CONDITIONAL


def warm_up() -> None:
    """Load genai-prices' data snapshot now, at instrument time, not on the first request."""
    try:
        data_snapshot.get_snapshot()
    except Exception:  # pragma: no cover - a broken snapshot only loses pricing
        warn_once("price:warmup", "chatter-otel: genai-prices failed to load", exc_info=True)
