"""Exactly once across crashes: the app is killed with SIGKILL at 20 seeded random moments
during chats and streamed runs, and restarted each time (PostgreSQL).

Every chat whose message commit returned has all its ledger rows and is counted in its
conversation (they committed with the message); no conversation is counted twice; no ledger
row is written twice. A streamed run (no message) that ended in the few milliseconds before the
kill, before its records reached the spool, may be missing: that window is documented.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from chatter_otel.persistence import LEDGER, RUNS
from chatter_otel.reference.app import Base, Conversation, Message, new_id
from tests.test_persistence import PG, _pg_admin

KILLS = 20
ROOT = Path(__file__).resolve().parent.parent


def _child(mode: str, url: str, spool: Path, cids: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests._crash_app", mode, url, str(spool), *cids],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _read_lines(proc: subprocess.Popen[str], out: list[str]) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.strip())

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


async def test_sigkill_at_random_moments_loses_no_committed_chat_and_counts_nothing_twice(
    tmp_path: Any,
) -> None:
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    url = PG.format(db=name)
    try:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            cids = [new_id() for _ in range(5)]
            await conn.execute(Conversation.__table__.insert(), [
                {"id": c, "total_tokens": 0, "total_cost": 0, "message_count": 0} for c in cids
            ])  # fmt: skip
        rng = random.Random(20261201)
        spool = tmp_path / "spool.db"
        committed: list[str] = []
        for _ in range(KILLS):
            lines: list[str] = []
            proc = _child("chat", url, spool, cids)
            pump = _read_lines(proc, lines)
            deadline = time.monotonic() + 60
            while "ready" not in lines and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            assert "ready" in lines, lines
            time.sleep(rng.uniform(0.05, 1.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            pump.join(5)
            committed += [line[2:] for line in lines if line.startswith("C ")]
        lines = []
        proc = _child("drain", url, spool, cids)
        pump = _read_lines(proc, lines)
        assert proc.wait(120) == 0
        pump.join(5)
        assert "drained" in lines

        async with engine.connect() as conn:
            runs = list(await conn.execute(select(RUNS)))
            ledger = list(await conn.execute(select(LEDGER)))
            messages = list(await conn.execute(select(Message.__table__)))
            convs = {r.id: r for r in await conn.execute(select(Conversation.__table__))}
        await engine.dispose()

        assert len(committed) >= KILLS  # the kills landed mid-work, after some commits
        per_run = Counter(r.workflow_id for r in ledger)
        by_message = {r.message_id: r for r in runs if r.message_id}
        for mid in committed:  # every committed chat: its run claimed, both its LLM calls
            run = by_message[mid]
            assert run.applied_at is not None
            assert per_run[run.workflow_id] == 2
        # No duplicate ledger rows: each finished run has exactly its 2 calls (records are
        # spooled in order, so a run's row implies its calls'); a run killed mid-way has at
        # most the calls that ended before the kill.
        assert all(per_run[r.workflow_id] == 2 for r in runs)
        assert all(n <= 2 for n in per_run.values())
        assert len(ledger) == len({r.span_id for r in ledger})
        tokens = {m.id: m.total_tokens for m in messages}
        for mid in committed:
            assert tokens[mid] == by_message[mid].total_tokens == 27
        for cid, conv in convs.items():  # each conversation: every claimed run, once
            applied = [r for r in runs if r.conversation_id == cid and r.applied_at is not None]
            assert conv.total_tokens == sum(r.total_tokens for r in applied)
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
