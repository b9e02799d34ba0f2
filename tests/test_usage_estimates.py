"""Opt-in usage estimates for calls that report none: counted, priced, flagged everywhere.

A real ``ChatOpenAI`` streams from the loopback server without asking for usage, so the
provider reports none; with ``estimate_usage`` the call gets estimated counts, flagged on its
span, its run, its ledger row, its metric points and the app's monitoring.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from langchain_openai import ChatOpenAI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel import configure, track_workflow
from chatter_otel.persistence import LEDGER, UsagePersistence
from chatter_otel.reference.demo import build_chat_graph
from tests.conftest import token_points
from tests.test_persistence import Host, database

__all__ = ["database"]  # the fixture, parametrized over SQLite and PostgreSQL


def words(text: str) -> int:
    """The app's own counter in these tests: one token per word (exact, easy to check)."""
    return len(text.split())


def _model(server: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(model="gpt-4o-mini", base_url=server.url, api_key="sk-loopback",
                      max_retries=0, **kw)  # fmt: skip


def _expected(server: Any, count: Any = words) -> tuple[int, int]:
    """(input, output) by the documented rule, from what the server received and sent:
    3 tokens per message + 3 priming the reply; the reply's text."""
    sent = server.requests[-1]["messages"]
    return 3 + sum(count(m["content"]) + 3 for m in sent), count(server.content)


def _price(inp: int, out: int) -> float:
    model = "gpt-4o-mini-2024-07-18"
    cost = calc_price(Usage(input_tokens=inp, output_tokens=out), model, provider_id="openai")
    return float(cost.total_price)


def test_a_stream_without_usage_gets_a_flagged_estimate(
    instrument: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spans = instrument(estimate_usage=words, prices={})
    chunks = list(_model(openai_server, stream_usage=False).stream("Say hello to the loopback"))
    assert len(chunks) > 1 and "stream_options" not in openai_server.requests[-1]
    a = spans.one("chat gpt-4o-mini").attributes
    inp, out = _expected(openai_server)
    assert (inp, out) == (3 + 5 + 3, 3)  # the rule, worked by hand once
    assert a["gen_ai.usage.input_tokens"] == inp
    assert a["gen_ai.usage.output_tokens"] == out
    assert a["chatter.usage.total_tokens"] == inp + out
    assert a["chatter.usage.estimated"] is True
    assert a["chatter.usage.estimator"] == "custom"
    assert "chatter.usage.missing" not in a  # not missing: estimated, and it says so
    assert a["gen_ai.usage.cost.amount"] == pytest.approx(_price(inp, out), rel=1e-12)
    # asked for estimates: no "reported no token usage" advice
    assert "reported no token usage" not in caplog.text


async def test_a_run_with_an_estimated_call_says_so(instrument: Any, openai_server: Any) -> None:
    spans = instrument(estimate_usage=words, prices={})
    measured = _model(openai_server, stream_usage=True)
    unmeasured = _model(openai_server, stream_usage=False)
    with track_workflow("two calls") as run:
        async for _ in measured.astream("first"):
            pass
        async for _ in unmeasured.astream("second question"):
            pass
    inp, out = _expected(openai_server)
    u = run.usage
    assert (u.llm_calls, u.usage_estimated_calls, u.usage_missing_calls) == (2, 1, 0)
    assert u.prompt_tokens == openai_server.usage["prompt_tokens"] + inp
    assert u.completion_tokens == openai_server.usage["completion_tokens"] + out
    calls = spans.named("chat gpt-4o-mini")
    assert [c.attributes.get("chatter.usage.estimated") for c in calls] == [None, True]
    assert spans.one("invoke_workflow two calls").attributes["chatter.usage.estimated"] is True


def test_a_measured_call_is_never_estimated(instrument: Any, openai_server: Any) -> None:
    counted: list[str] = []

    def counter(text: str) -> int:
        counted.append(text)
        return 1

    spans = instrument(estimate_usage=counter, prices={})
    list(_model(openai_server, stream_usage=True).stream("hi"))
    _model(openai_server).invoke("hi")
    assert counted == []
    for span in spans.named("chat gpt-4o-mini"):
        assert span.attributes["gen_ai.usage.input_tokens"] == 23
        assert "chatter.usage.estimated" not in span.attributes


def test_a_failed_call_is_not_estimated(instrument: Any, openai_server: Any) -> None:
    import openai

    spans = instrument(estimate_usage=words, prices={})
    openai_server.status = 500
    with pytest.raises(openai.InternalServerError):
        list(_model(openai_server, stream_usage=False).stream("hi"))
    a = spans.one("chat gpt-4o-mini").attributes
    assert "gen_ai.usage.input_tokens" not in a and "chatter.usage.estimated" not in a


def test_on_by_environment_without_tiktoken_data_counts_characters(
    instrument: Any, openai_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """``CHATTER_OTEL_ESTIMATE_USAGE=true`` with tiktoken installed but its encoding out of
    reach (an empty cache, and no route out): one line says so, and the estimate counts 4
    characters per token, named ``chars/4``."""
    monkeypatch.setenv("CHATTER_OTEL_ESTIMATE_USAGE", "true")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # refused at once, online or not
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # the loopback model stays reachable
    spans = instrument(prices={})
    list(_model(openai_server, stream_usage=False).stream("Say hello"))
    a = spans.one("chat gpt-4o-mini").attributes

    def chars(text: str) -> int:
        return -(-len(text) // 4)

    assert a["chatter.usage.estimator"] == "chars/4"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == _expected(
        openai_server, chars
    )
    lines = [r.getMessage() for r in caplog.records if "o200k_base" in r.getMessage()]
    assert len(lines) == 1 and "TIKTOKEN_CACHE_DIR" in lines[0]


def test_a_counter_that_fails_leaves_the_call_missing(
    instrument: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(text: str) -> int:
        raise RuntimeError("tokenizer file gone")

    spans = instrument(estimate_usage=broken, prices={})
    for _ in range(3):
        list(_model(openai_server, stream_usage=False).stream("hi"))
    for span in spans.named("chat gpt-4o-mini"):
        assert span.attributes["chatter.usage.missing"] is True
        assert "gen_ai.usage.input_tokens" not in span.attributes
    lines = [r.getMessage() for r in caplog.records if "usage estimator" in r.getMessage()]
    assert lines == ["chatter-otel: the usage estimator custom raised RuntimeError; the call's "
                     "usage stays missing"]  # fmt: skip


def test_a_counter_that_returns_no_count_leaves_the_call_missing(
    instrument: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spans = instrument(estimate_usage=lambda text: -1.5, prices={})
    list(_model(openai_server, stream_usage=False).stream("hi"))
    assert spans.one("chat gpt-4o-mini").attributes["chatter.usage.missing"] is True
    assert "returned -1.5, not a token count" in caplog.text


def test_a_bad_option_warns_and_estimates_nothing(
    instrument: Any, openai_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        spans = instrument(estimate_usage="sometimes", prices={})
    list(_model(openai_server, stream_usage=False).stream("hi"))
    assert spans.one("chat gpt-4o-mini").attributes["chatter.usage.missing"] is True
    assert "ignoring estimate_usage='sometimes'" in caplog.text


async def test_the_ledger_metrics_and_monitoring_flag_estimates(
    database: str, tmp_path: Any, openai_server: Any
) -> None:
    """Through ``configure`` as an app runs it: the ledger row of the estimated call says so
    (the measured one says not), the token metric's points carry the flag (so a query can
    leave estimates out), and the ledger's sums equal the metric's."""
    host = Host(database)
    await host.setup()
    reader = InMemoryMetricReader()
    persistence = UsagePersistence(database, spool_path=tmp_path / "spool.db")
    tel = configure(
        tracer_provider=TracerProvider(), meter_provider=MeterProvider(metric_readers=[reader]),
        persistence=persistence, prices={}, estimate_usage=words, set_global=False,
    )  # fmt: skip
    try:
        cid = await host.new_conversation()
        host.graph = build_chat_graph(_model(openai_server, stream_usage=True, streaming=True))
        await host.chat(cid, "measured question")
        host.graph = build_chat_graph(_model(openai_server, stream_usage=False, streaming=True))
        await host.chat(cid, "estimated question here")
        inp, out = _expected(openai_server)
        assert await asyncio.to_thread(persistence.flush, 30), persistence.stats
        assert tel.force_flush()
        rows = sorted(await host.rows(LEDGER), key=lambda r: r.started_at)
        assert [r.usage_estimated for r in rows] == [False, True]
        assert (rows[1].input_tokens, rows[1].output_tokens) == (inp, out)
        assert float(rows[1].cost) == pytest.approx(_price(inp, out), rel=1e-9)
        points: dict[tuple[str, bool], int] = {}
        for p in token_points(reader):
            key = (p.attributes["gen_ai.token.type"],
                   bool(p.attributes.get("chatter.usage.estimated")))  # fmt: skip
            points[key] = points.get(key, 0) + int(p.sum)
        assert points == {
            ("input", False): rows[0].input_tokens, ("output", False): rows[0].output_tokens,
            ("input", True): inp, ("output", True): out,
        }  # fmt: skip
        openai = tel.monitoring.get_workflow_stats()["providers"]["openai"]
        assert (openai["calls"], openai["calls_estimated"], openai["calls_without_usage"]) == (
            2, 1, 0)  # fmt: skip
        assert openai["input_tokens"] == rows[0].input_tokens + inp
    finally:
        tel.shutdown()
        await host.engine.dispose()
