"""The ledger's sweep (runs no message took, applied after ``grace_s``) looks at the database
when a run falls due, and otherwise once per ``grace_s``: not once a second, however idle the
app (it did: a transaction and a query a second, per process)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event

from chatter_otel.persistence import RUNS
from tests.test_persistence import (  # noqa: F401 - database: its fixture
    Host,
    _flush,
    _hosted,
    database,
    fresh_pg,
    old_release_runs,
)

if TYPE_CHECKING:
    import pytest

GRACE_S = 3.0


def _is_sweep(statement: str) -> bool:
    return "FROM chatter_usage_runs" in statement and "finished_at <" in statement


async def test_the_sweep_runs_when_a_run_falls_due_not_every_second(
    database: str,  # noqa: F811 - the fixture imported above
    tmp_path: Any,
) -> None:
    sweeps: list[float] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name == "chatter-otel-ledger" and _is_sweep(statement):
            sweeps.append(time.time())

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        async with _hosted(database, tmp_path, grace_s=GRACE_S) as (host, p):
            cid = await host.new_conversation()
            # Idle: at most one look per grace_s (it was one a second: 4 here).
            idle_from = time.time()
            await asyncio.sleep(4.0)
            idle = [t for t in sweeps if t >= idle_from]
            assert len(idle) <= 2, idle

            # A streamed run no message takes: applied when it falls due, not a slow cadence
            # later (the worker that wrote it knows when).
            await host.stream(cid, "What is the weather in Tokyo?")
            finished = time.time()
            for _ in range(300):
                if (await host.conversation(cid)).total_tokens:
                    break
                await asyncio.sleep(0.05)
            applied = time.time()
            one = (await host.conversation(cid)).total_tokens
            assert one > 0
            assert finished + GRACE_S - 0.5 <= applied <= finished + GRACE_S + 1.5

            # Three falling due one after the other: still at most one look a second.
            for city in ("Oslo", "Lima", "Rome"):
                await host.stream(cid, f"What is the weather in {city}?")
            for _ in range(300):
                if (await host.conversation(cid)).total_tokens == 4 * one:
                    break
                await asyncio.sleep(0.05)
            assert (await host.conversation(cid)).total_tokens == 4 * one
            gaps = [b - a for a, b in itertools.pairwise(sweeps)]
            assert min(gaps) >= 0.9, gaps

            # A run some other process wrote and did not live to apply: the slow look finds it.
            other = await host.new_conversation()
            async with host.engine.begin() as conn:
                await conn.execute(RUNS.insert().values(
                    workflow_id="0123456789abcdef", trace_id="0" * 32, conversation_id=other,
                    input_tokens=5, output_tokens=2, total_tokens=7, cost=Decimal("0.0001"),
                    status="ok", response_time_ms=10, finished_at=time.time() - GRACE_S - 1,
                    applied_at=None))  # fmt: skip
            for _ in range(200):
                if (await host.conversation(other)).total_tokens:
                    break
                await asyncio.sleep(0.05)
            assert (await host.conversation(other)).total_tokens == 7
            await _flush(p)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)


async def test_an_index_that_cannot_be_added_leaves_the_ledger_working(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep's index is only speed: where it cannot be added to a runs table an older
    release made (here its name is taken), one line says so and every record is written."""
    from sqlalchemy import MetaData

    async with fresh_pg() as url:
        old = MetaData()
        old_release_runs(old)
        host = Host(url)
        await host.setup()
        async with host.engine.begin() as conn:
            await conn.run_sync(old.create_all)
            await conn.exec_driver_sql("CREATE TABLE decoy (x integer)")
            await conn.exec_driver_sql("CREATE INDEX ix_chatter_usage_runs_unapplied ON decoy (x)")
        await host.engine.dispose()
        async with _hosted(url, tmp_path) as (host2, p):
            cid = await host2.new_conversation()
            await host2.chat(cid, "weather in Quito")
            await _flush(p)
            assert (await host2.conversation(cid)).total_tokens > 0
            assert p.stats["in_transaction"] == 1 and p.stats["quarantined"] == 0
        assert "cannot add index ix_chatter_usage_runs_unapplied" in caplog.text
