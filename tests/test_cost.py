"""Cost: genai-prices for known models, the override table, and no cost when unpriceable."""

from __future__ import annotations

import random
import re
from decimal import Decimal
from importlib.metadata import version
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from genai_prices.types import ModelPrice
from langchain_core.messages import AIMessage

from tests.test_usage import Scripted

MODELS = [  # flat, tiered and time-of-day priced models, across providers
    ("openai", "openai", "gpt-4o-mini"),
    ("openai", "openai", "gpt-4o"),
    ("openai", "openai", "o3-mini"),
    ("anthropic", "anthropic", "claude-sonnet-4-5"),
    ("anthropic", "anthropic", "claude-3-5-haiku-latest"),
    ("gcp.gemini", "google", "gemini-2.5-pro"),
    ("gcp.gemini", "google", "gemini-2.5-flash"),
    ("deepseek", "deepseek", "deepseek-chat"),
]


def _msg(i: int, o: int, cr: int | None, cw: int | None, r: int | None) -> AIMessage:
    details_in = {k: v for k, v in (("cache_read", cr), ("cache_creation", cw)) if v is not None}
    details_out = {"reasoning": r} if r is not None else {}
    return AIMessage(
        "ok",
        usage_metadata={
            "input_tokens": i,
            "output_tokens": o,
            "total_tokens": i + o,
            "input_token_details": details_in,
            "output_token_details": details_out,
        },
    )


@pytest.mark.parametrize(("ls_provider", "gp_provider", "model"), MODELS)
def test_cost_equals_genai_prices_exactly(
    spans: Any, ls_provider: str, gp_provider: str, model: str
) -> None:
    from chatter_otel import track_workflow

    rng = random.Random(f"{model}-seed")
    for _ in range(25):
        i, o = rng.randint(0, 400_000), rng.randint(0, 60_000)
        cr = rng.choice([None, rng.randint(0, i)])
        cw = rng.choice([None, rng.randint(0, i - (cr or 0))])
        r = rng.choice([None, rng.randint(0, o)])
        expected = calc_price(
            Usage(
                input_tokens=i,
                output_tokens=o,
                cache_read_tokens=cr,
                cache_write_tokens=cw,
                output_reasoning_tokens=r,
            ),
            model,
            provider_id=gp_provider,
        ).total_price
        spans.clear()
        with track_workflow("t") as run:
            Scripted(message=_msg(i, o, cr, cw, r), provider=ls_provider, model=model).invoke("x")
        assert run.usage.cost == expected  # exact Decimal, not approximately
        a = spans.starting("chat")[0].attributes
        assert a["gen_ai.usage.cost.amount"] == float(expected)
        assert a["gen_ai.usage.cost.source"] == "local"
        assert a["gen_ai.usage.cost.price_table"] == f"genai-prices {version('genai-prices')}"


def test_unknown_model_has_no_cost_never_zero(spans: Any, caplog: Any) -> None:
    msg = _msg(100, 10, None, None, None)
    Scripted(message=msg, provider="openai", model="my-private-finetune-xyz").invoke("x")
    a = spans.starting("chat")[0].attributes
    assert "gen_ai.usage.cost.amount" not in a
    assert a["gen_ai.usage.input_tokens"] == 100
    assert "my-private-finetune-xyz" in caplog.text


def test_override_table_by_model_and_by_provider_model(instrument: Any) -> None:
    spans = instrument(
        prices={
            "my-llama": {"input_mtok": "2", "output_mtok": "4"},
            "openai:my-llama": ModelPrice(input_mtok=Decimal(10), output_mtok=Decimal(20)),
            "broken": {"input_mtok": "free"},
        }
    )
    msg = _msg(1_000, 500, None, None, None)
    Scripted(message=msg, provider="selfhosted", model="my-llama").invoke("x")
    Scripted(message=msg, provider="openai", model="my-llama").invoke("x")
    Scripted(message=msg, provider="selfhosted", model="broken").invoke("x")
    a1, a2, a3 = (s.attributes for s in sorted(spans.starting("chat"), key=lambda s: s.start_time))
    assert a1["gen_ai.usage.cost.amount"] == pytest.approx((1000 * 2 + 500 * 4) / 1e6)
    assert a2["gen_ai.usage.cost.amount"] == pytest.approx((1000 * 10 + 500 * 20) / 1e6)
    assert "gen_ai.usage.cost.amount" not in a3  # invalid override ignored with a warning
    # the app's table, named by a digest of its content: another table is another name
    table = a1["gen_ai.usage.cost.price_table"]
    assert a2["gen_ai.usage.cost.price_table"] == table
    assert re.fullmatch(r"override [0-9a-f]{12}", table)
    from chatter_otel.instrumentation.cost import _override_table

    same = {"my-llama": {"input_mtok": "2", "output_mtok": "4"}}
    assert _override_table(same) == _override_table(dict(same))
    assert _override_table(same) != _override_table({"my-llama": {"input_mtok": "3"}})


def test_a_cost_the_provider_reported_names_no_price_table(spans: Any) -> None:
    from langchain_core.messages import AIMessage as Msg

    msg = Msg("ok", usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
              response_metadata={"token_usage": {"cost": 0.0042}})  # fmt: skip
    Scripted(message=msg, provider="openrouter", model="gpt-4o-mini").invoke("x")
    a = spans.starting("chat")[0].attributes
    assert a["gen_ai.usage.cost.source"] == "provider" and a["gen_ai.usage.cost.amount"] == 0.0042
    assert "gen_ai.usage.cost.price_table" not in a


def test_auto_updated_prices_name_their_update_time() -> None:
    import datetime as dt

    from chatter_otel.instrumentation.cost import _snapshot_table

    class Snap:
        from_auto_update = True
        timestamp = dt.datetime(2026, 12, 1, 9, 30, tzinfo=dt.UTC)

    assert _snapshot_table(Snap()) == (
        f"genai-prices {version('genai-prices')}, updated 2026-12-01T09:30Z"
    )


def test_inconsistent_counts_do_not_raise(spans: Any) -> None:
    # more cached tokens than input tokens: genai-prices rejects it; no cost, no exception
    msg = _msg(10, 5, 50, None, None)
    Scripted(message=msg, provider="openai", model="gpt-4o-mini").invoke("x")
    a = spans.starting("chat")[0].attributes
    assert a["gen_ai.usage.input_tokens"] == 10
    assert "gen_ai.usage.cost.amount" not in a
