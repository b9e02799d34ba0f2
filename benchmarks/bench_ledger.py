"""The usage ledger: its throughput, and what it costs the request path.

**Throughput**: ``N`` ledger records (one per LLM call, as the span processor makes them) are
submitted as fast as possible and timed until ``flush()`` says they are in the database, on
SQLite (aiosqlite, a file) and on PostgreSQL (asyncpg, the test PostgreSQL of
scripts/services.sh, a scratch database).
Every record passes through the durable spool first, so this is the end-to-end rate.

**Request path**: the host app's chat (the reference workflow with ``ainvoke``, then the app
saves the assistant message with zeros and updates its aggregates, on its own SQLite file) in
interleaved rounds under four setups: ``bare`` (no instrumentation), ``traced`` (``configure``
without persistence), ``ledger`` (with persistence into the app's database) and
``ledger_db_down`` (its PostgreSQL refuses connections). Medians of per-round means, µs per
chat; the ratio is against ``bare`` in the same process. A listener on every engine counts the
statements each thread runs: the app's thread must run none of the ledger's.

    python -m benchmarks.bench_ledger [--records N] [--chats N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import Engine, event, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from chatter_otel import configure
from chatter_otel.persistence import UsagePersistence
from chatter_otel.reference.app import Base, Conversation, Message, MessageRole, new_id
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

PG_PORT = int(os.environ.get("CHATTER_OTEL_PG_PORT", "55432"))
PG_ADMIN = {"host": "127.0.0.1", "port": PG_PORT, "user": "postgres", "database": "test"}
LEDGER_THREAD = "chatter-otel-ledger"


def _record(i: int) -> dict[str, Any]:
    return {
        "span_id": f"{i:016x}", "trace_id": uuid.uuid4().hex, "workflow_id": f"{i // 2:016x}",
        "conversation_id": "bench", "message_id": None, "correlation_id": "c", "user_id": "u",
        "provider": "openai", "model": "gpt-4o-mini", "input_tokens": 23, "output_tokens": 7,
        "total_tokens": 30, "cache_read_tokens": 4, "cache_creation_tokens": None,
        "reasoning_tokens": 0, "cost": Decimal("0.0000072"), "currency": "USD",
        "cost_source": "local", "finish_reason": "stop", "started_at": time.time(),
        "duration_ms": 12.5, "status": "ok",
    }  # fmt: skip


def throughput(url: str, records: int, spool: Path) -> float:
    """Records per second from ``submit`` to the database."""
    p = UsagePersistence(url, spool_path=spool, max_queue=records + 1)
    p.start()
    try:
        assert p.flush(30), "the ledger did not start"
        p.submit("llm", _record(10**9))  # tables created, connections warm
        assert p.flush(30)
        t0 = time.perf_counter()
        for i in range(records):
            p.submit("llm", _record(i))
        assert p.flush(600), p.stats
        return records / (time.perf_counter() - t0)
    finally:
        p.close()


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(**PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class App:
    """The host app's chat: run the graph, then save the answer with zeros and update totals."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_async_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.graph = build_chat_graph()
        self.cid = new_id()

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with self.sessions() as s:
            s.add(Conversation(id=self.cid, total_tokens=0, total_cost=0, message_count=0))
            await s.commit()

    async def chat(self) -> None:
        out = await self.graph.ainvoke({"messages": [HumanMessage("weather in Paris")]},
                                       {"configurable": {"thread_id": self.cid}})  # fmt: skip
        async with self.sessions() as s:
            answer = str(out["messages"][-1].content)
            s.add(Message(conversation_id=self.cid, role=MessageRole.ASSISTANT, content=answer,
                          sequence_number=0, prompt_tokens=0, completion_tokens=0,
                          total_tokens=0, cost=0))  # fmt: skip
            await s.execute(
                update(Conversation)
                .where(Conversation.id == self.cid)
                .values(message_count=Conversation.message_count + 1,
                        total_tokens=Conversation.total_tokens + 0)
            )  # fmt: skip
            await s.commit()


async def _round(app: App, chats: int, mode: str, tmp: Path) -> float:
    tel = persistence = None
    if mode != "bare":
        if mode == "ledger":  # the app's own database, as in production
            persistence = UsagePersistence(app.url, spool_path=tmp / "spool.db")
        elif mode == "ledger_db_down":  # nothing listens on port 9: connections are refused
            persistence = UsagePersistence("postgresql+asyncpg://postgres@127.0.0.1:9/none",
                                           spool_path=tmp / "spool-down.db")  # fmt: skip
        tel = configure(tracer_provider=TracerProvider(), prices=LOCAL_MODEL_PRICES,
                        persistence=persistence, log_correlation=False)  # fmt: skip
    if persistence is not None:
        assert await asyncio.to_thread(persistence.flush, 10) or mode == "ledger_db_down"
    try:
        t0 = time.perf_counter()
        for _ in range(chats):
            await app.chat()
        return (time.perf_counter() - t0) / chats * 1e6
    finally:
        if tel is not None:
            tel.shutdown(timeout_millis=500)


async def request_path(app_url: str, chats: int, rounds: int, tmp: Path) -> None:
    app = App(app_url)
    await app.setup()
    modes = ("bare", "traced", "ledger", "ledger_db_down")
    statements: Counter[tuple[str, str]] = Counter()

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        who = "ledger" if threading.current_thread().name == LEDGER_THREAD else "other"
        statements[who, "ledger" if "chatter_usage" in statement else "app"] += 1

    event.listen(Engine, "before_cursor_execute", count)
    for mode in modes:
        await _round(app, 5, mode, tmp)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            times[mode].append(await _round(app, chats, mode, tmp))
    event.remove(Engine, "before_cursor_execute", count)
    await app.engine.dispose()
    base = statistics.median(times["bare"])
    print(f"\nrequest path, app on {app.engine.dialect.name}: {chats} chats per round, "
          f"{rounds} rounds (medians), ratio vs bare")  # fmt: skip
    for mode, values in times.items():
        med = statistics.median(values)
        print(f"  {mode:<15} {med:9.1f} µs/chat  ratio {med / base:.3f}")
    print("  SQL statements by thread: "
          f"app's threads ran {statements['other', 'app']} of the app's and "
          f"{statements['other', 'ledger']} of the ledger's; the ledger's worker ran "
          f"{statements['ledger', 'ledger']} of its own")  # fmt: skip
    assert statements["other", "ledger"] == 0, "ledger SQL on the request path"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pg = _scratch_pg()
        print(f"ledger throughput, {args.records} records (submit -> spool -> database):")
        rate = throughput(f"sqlite+aiosqlite:///{tmp}/t.db", args.records, tmp / "s1.db")
        print(f"  sqlite      {rate:10.0f} records/s")
        if pg:
            rate = throughput(pg.format("ledger"), args.records, tmp / "s2.db")
            print(f"  postgresql  {rate:10.0f} records/s")
        try:
            asyncio.run(request_path(f"sqlite+aiosqlite:///{tmp}/app.db", args.chats,
                                     args.rounds, tmp))  # fmt: skip
            if pg:
                asyncio.run(request_path(pg.format("app"), args.chats, args.rounds, tmp))
        finally:
            if pg:
                for db in ("ledger", "app"):
                    asyncio.run(_pg(f"DROP DATABASE IF EXISTS {pg.format(db).rsplit('/', 1)[1]}"
                                    " WITH (FORCE)"))  # fmt: skip


def _scratch_pg() -> str | None:
    """Two scratch databases on the local PostgreSQL; a URL template, or None if it is down."""
    prefix = f"chatter_bench_{uuid.uuid4().hex[:8]}"
    try:
        for db in ("ledger", "app"):
            asyncio.run(_pg(f"CREATE DATABASE {prefix}_{db}"))
    except OSError as exc:
        print(f"PostgreSQL unavailable ({exc}): SQLite only")
        return None
    return f"postgresql+asyncpg://postgres@127.0.0.1:{PG_PORT}/{prefix}_{{}}"


if __name__ == "__main__":
    main()
