"""The ledger's worker and the app's transaction writing the same run at once (PostgreSQL).

The app's one statement claims the run (its row) and then writes its call rows; the worker's
batch must take them in the same order, or each holds what the other waits for: PostgreSQL
ends one of the two after ``deadlock_timeout`` (a second the app's request waited, and its run
went to the worker instead). Found by ``benchmarks/bench_request.py``: about one chat in thirty
on one conversation."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from langchain_core.messages import HumanMessage
from sqlalchemy import text

from chatter_otel import track_workflow
from chatter_otel.persistence import LEDGER, RUNS
from chatter_otel.persistence.schema import fit, insert_ignore, ledger_row, run_row
from tests.conftest import PG_PORT
from tests.test_persistence import PG, _hosted, _pg_admin


async def _waiting_on_a_lock(database: str) -> int:
    conn = await asyncpg.connect(host="127.0.0.1", port=PG_PORT, user="postgres",
                                 database="test")  # fmt: skip
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = "
            "'Lock'", database))  # fmt: skip
    finally:
        await conn.close()


async def test_the_worker_takes_a_run_s_row_before_its_call_rows(tmp_path: Any) -> None:
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    try:
        # batch_delay_s: the run's records wait in the spool until the flush below
        async with _hosted(PG.format(db=name), tmp_path, batch_delay_s=3600.0) as (host, p):
            async with track_workflow("chat") as run:
                await host.graph.ainvoke({"messages": [HumanMessage("weather in Oslo")]})
            assert run.record is not None and len(run.calls) == 2
            async with host.engine.connect() as app:
                await app.begin()
                # The app's statement, first half: the run's row, claimed.
                await app.execute(insert_ignore(app.sync_connection, RUNS, "workflow_id"),
                                  [fit(RUNS, run_row(run.record, applied_at=1.0))])  # fmt: skip
                flushed = asyncio.create_task(asyncio.to_thread(p.flush, 30))
                for _ in range(300):  # the worker's batch now waits for that row
                    if await _waiting_on_a_lock(name):
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the worker never waited for the run's row")
                # Second half: its call rows. A worker that took them first makes this wait
                # (and the lock timeout says so) where it would deadlock.
                await app.execute(text("SET LOCAL lock_timeout = '200ms'"))
                await app.execute(insert_ignore(app.sync_connection, LEDGER, "span_id"),
                                  [fit(LEDGER, ledger_row(c)) for c in run.calls])  # fmt: skip
                await app.commit()
            assert await flushed
            assert p.stats["quarantined"] == 0
            async with host.engine.connect() as conn:
                runs = (await conn.execute(RUNS.select())).all()
                calls = (await conn.execute(LEDGER.select())).all()
            assert [(r.workflow_id, r.applied_at) for r in runs] == [(run.workflow_id, 1.0)]
            assert sorted(c.span_id for c in calls) == sorted(c.span_id for c in run.calls)
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
