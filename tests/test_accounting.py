"""Accounting is not sampling: whatever the sampler decides, every run is accounted exactly.

200 chats under ``ParentBased(TraceIdRatioBased(0.1))`` and under ``ALWAYS_OFF``, on SQLite and
PostgreSQL: ledger rows = LLM calls, conversation totals = the sums of their messages, one
monitoring entry and one set of workflow events per run, the token metric's sum = the true
token sum; and only the sampled traces are exported.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ParentBased,
    TraceIdRatioBased,
)

from chatter_otel import configure, last_run
from chatter_otel.persistence import LEDGER, RUNS, UsagePersistence
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from tests.conftest import token_sum
from tests.test_persistence import Host, database

__all__ = ["database"]  # the fixture, parametrized over SQLite and PostgreSQL

CHATS, CONVERSATIONS = 200, 10
TOKENS_PER_CHAT = 27  # the reference run: 16 input + 11 output, over 2 LLM calls


class ListBus:
    """An app's own event sink: keeps every event."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> None:
        self.events.append(event)


@pytest.mark.parametrize(
    "sampler",
    [ParentBased(TraceIdRatioBased(0.1)), ALWAYS_OFF],
    ids=["ratio-0.1", "always-off"],
)
async def test_every_run_is_accounted_whatever_the_sampler(
    database: str, tmp_path: Any, sampler: Any
) -> None:
    host = Host(database)
    await host.setup()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    bus = ListBus()
    persistence = UsagePersistence(database, spool_path=tmp_path / "spool.db")
    tel = configure(
        tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader]),
        persistence=persistence, events=bus, prices=LOCAL_MODEL_PRICES,
    )  # fmt: skip
    try:
        cids = [await host.new_conversation() for _ in range(CONVERSATIONS)]
        trace_ids: list[str] = []
        for i in range(CHATS):
            await host.chat(cids[i % CONVERSATIONS], "What is the weather in Paris?")
            run = last_run()
            assert run is not None and run.trace_id is not None
            trace_ids.append(run.trace_id)
        assert await asyncio.to_thread(persistence.flush, 30), persistence.stats
        assert tel.force_flush()  # the processors' workers too

        # the ledger: one row per LLM call, exactly once
        ledger = await host.rows(LEDGER)
        assert len(ledger) == 2 * CHATS
        assert len({r.span_id for r in ledger}) == 2 * CHATS
        assert sum(r.total_tokens for r in ledger) == TOKENS_PER_CHAT * CHATS
        runs = await host.rows(RUNS)
        assert len(runs) == CHATS and all(r.applied_at is not None for r in runs)
        # conversations: exactly the sum of their messages
        for cid in cids:
            messages = await host.messages(cid)
            conv = await host.conversation(cid)
            assert len(messages) == CHATS // CONVERSATIONS
            assert all(m.total_tokens == TOKENS_PER_CHAT for m in messages)
            assert conv.total_tokens == sum(m.total_tokens for m in messages)
            assert Decimal(str(conv.total_cost)).quantize(Decimal("1e-9")) == sum(
                (Decimal(str(m.cost)) for m in messages), Decimal(0)
            ).quantize(Decimal("1e-9"))
        # monitoring: one entry per run, finished
        ops = tel.monitoring.get_workflow_stats()["workflow_ops"]
        assert (ops["started"], ops["finished"], ops["active"]) == (CHATS, CHATS, 0)
        # events: one workflow_started and one workflow_completed per run, for every run
        kinds = Counter(e.event_type for e in bus.events)
        assert kinds["workflow_started"] == kinds["workflow_completed"] == CHATS
        assert {e.trace_id for e in bus.events if e.event_type == "workflow_completed"} == set(
            trace_ids
        )
        # metrics: the true token sum
        assert token_sum(reader) == TOKENS_PER_CHAT * CHATS
        # export: only the sampled traces, each whole
        exported = exporter.get_finished_spans()
        assert all(s.context.trace_flags.sampled for s in exported)
        by_trace = Counter(format(s.context.trace_id, "032x") for s in exported)
        if sampler is ALWAYS_OFF:
            assert not exported
        else:
            ratio = TraceIdRatioBased(0.1)
            expected = {
                t for t in trace_ids if int(t, 16) & TraceIdRatioBased.TRACE_ID_LIMIT < ratio.bound
            }
            assert set(by_trace) == expected
            assert 0 < len(expected) < CHATS
            assert set(by_trace.values()) == {7}  # each sampled run whole: 7 spans
    finally:
        tel.shutdown()
        await host.engine.dispose()
