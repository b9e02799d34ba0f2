"""Usage lands in a host app's messages and conversations, on real PostgreSQL and on SQLite.

The host app is reproduced as it really behaves, on the reference app's models (26-character
ids, the role stored by its enum name, nullable usage columns, NOT NULL totals): it runs the
graph, then (same task) inserts the assistant message with zeros in the usage columns and updates
its aggregates with +0; its streaming endpoint saves no message at all. It never tells anyone the
message id in advance.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import sqlalchemy
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import (
    Engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from chatter_otel import _safety, configure, track_workflow
from chatter_otel.persistence import LEDGER, RUNS, MessageMapping, UsagePersistence, spool
from chatter_otel.persistence.one_statement import function_name, view_name
from chatter_otel.reference.app import Base, Conversation, Message, new_id
from chatter_otel.reference.app import MessageRole as Role
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from tests.conftest import PG_PORT

_SQLALCHEMY = tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2])

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

PG = f"postgresql+asyncpg://postgres@127.0.0.1:{PG_PORT}/{{db}}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=PG_PORT, user="postgres", database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def old_release_runs(meta: Any) -> Any:
    """The runs table as an older release made it: no index for the sweep."""
    from sqlalchemy import Column, Table

    return Table(RUNS.name, meta, *(Column(c.name, c.type, primary_key=c.primary_key)
                                    for c in RUNS.columns))  # fmt: skip


@asynccontextmanager
async def fresh_pg() -> AsyncIterator[str]:
    """A PostgreSQL database of its own on the test server, dropped after."""
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    try:
        yield PG.format(db=name)
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: Any, tmp_path: Any) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/app.db"
        return
    async with fresh_pg() as url:
        yield url


class Host:
    """The host app: its engine, tables, and its chat code path."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.graph = build_chat_graph()

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def new_conversation(self) -> str:
        cid = new_id()
        async with self.sessions() as s:
            s.add(Conversation(id=cid, total_tokens=0, total_cost=0, message_count=0))
            await s.commit()
        return cid

    async def save_assistant(self, cid: str, content: str, message_id: str | None = None) -> str:
        mid = message_id or new_id()
        async with self.sessions() as s:
            s.add(Message(id=mid, conversation_id=cid, role=Role.ASSISTANT, content=content,
                          sequence_number=0, prompt_tokens=0, completion_tokens=0, total_tokens=0,
                          cost=0))  # fmt: skip
            await s.execute(
                update(Conversation)
                .where(Conversation.id == cid)
                .values(
                    total_tokens=Conversation.total_tokens + 0,
                    total_cost=Conversation.total_cost + 0,
                    message_count=Conversation.message_count + 1,
                )
            )
            await s.commit()
        return mid

    async def chat(self, cid: str, text_: str) -> str:
        out = await self.graph.ainvoke({"messages": [HumanMessage(text_)]},
                                       {"configurable": {"thread_id": cid}})  # fmt: skip
        return await self.save_assistant(cid, str(out["messages"][-1].content))

    async def stream(self, cid: str, text_: str) -> None:
        state = {"messages": [HumanMessage(text_)]}
        async for _ in self.graph.astream_events(state, {"configurable": {"thread_id": cid}},
                                                 version="v2"):  # fmt: skip
            pass

    async def conversation(self, cid: str) -> Conversation:
        async with self.sessions() as s:
            return await s.get(Conversation, cid)

    async def messages(self, cid: str) -> list[Message]:
        async with self.sessions() as s:
            q = select(Message).where(Message.conversation_id == cid)
            return list((await s.execute(q)).scalars())

    async def rows(self, table: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(select(table)))


async def _configure(url: Any, tmp_path: Any, **kw: Any) -> tuple[Any, UsagePersistence]:
    persistence = UsagePersistence(url, spool_path=tmp_path / "spool.db", **kw)
    tel = configure(tracer_provider=TracerProvider(), persistence=persistence,
                    prices=LOCAL_MODEL_PRICES)  # fmt: skip
    return tel, persistence


@asynccontextmanager
async def _hosted(
    url: str, tmp_path: Any, **kw: Any
) -> AsyncIterator[tuple[Host, UsagePersistence]]:
    """The host app on its database, with telemetry and usage persistence configured."""
    host = Host(url)
    await host.setup()
    tel, p = await _configure(url, tmp_path, **kw)
    try:
        yield host, p
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def _flush(p: UsagePersistence) -> None:
    assert await asyncio.to_thread(p.flush, 20), p.stats


async def _until_applied(host: Host, p: UsagePersistence, cid: str) -> None:
    """Wait (bounded) until the worker has added a run to the conversation (after grace_s)."""
    for _ in range(200):
        await _flush(p)
        if (await host.conversation(cid)).total_tokens:
            return
        await asyncio.sleep(0.05)


def _approx(value: Any) -> Any:
    return pytest.approx(float(value), abs=1e-9)


async def test_unwrapped_run_fills_the_message_and_the_totals(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(host.engine, tmp_path)  # pointed at the app's engine
    try:
        cid = await host.new_conversation()
        mid = await host.chat(cid, "What is the weather in Paris?")
        await _flush(p)
        (msg,) = await host.messages(cid)
        assert msg.id == mid
        assert (msg.prompt_tokens, msg.completion_tokens, msg.total_tokens) == (16, 11, 27)
        assert float(msg.cost) == _approx(Decimal("0.0000245"))
        assert (msg.provider_used, msg.model_used) == ("chatter.local", "chatter-local-1")
        assert msg.response_time_ms is not None
        conv = await host.conversation(cid)
        assert (conv.total_tokens, conv.message_count) == (27, 1)
        assert float(conv.total_cost) == _approx(msg.cost)
        ledger = await host.rows(LEDGER)
        assert len(ledger) == 2  # one row per LLM call, the source of truth
        assert sum(r.total_tokens for r in ledger) == 27
        assert {r.conversation_id for r in ledger} == {cid}
        assert {r.message_id for r in ledger} == {mid}  # each call names its message
        (run,) = await host.rows(RUNS)
        assert run.message_id == mid and run.applied_at is not None and run.status == "ok"
    finally:
        tel.shutdown()
        await host.engine.dispose()


@pytest.mark.parametrize("written_first", [False, True], ids=["in-transaction", "worker-first"])
async def test_every_ledger_row_names_the_message_it_answers(
    database: str, tmp_path: Any, written_first: bool
) -> None:
    """Whether the app's transaction writes the call rows or the worker wrote them first
    (without the message, not known yet), they end up naming the message, as the run row does."""
    async with _hosted(database, tmp_path) as (host, p):
        cid = await host.new_conversation()
        out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Rome")]},
                                       {"configurable": {"thread_id": cid}})  # fmt: skip
        if written_first:
            await _flush(p)
            assert {r.message_id for r in await host.rows(LEDGER)} == {None}
        mid = await host.save_assistant(cid, str(out["messages"][-1].content))
        await _flush(p)
        ledger = await host.rows(LEDGER)
        assert len(ledger) == 2 and {r.message_id for r in ledger} == {mid}
        (run,) = await host.rows(RUNS)
        assert run.message_id == mid
        assert (await host.conversation(cid)).total_tokens == sum(r.total_tokens for r in ledger)


async def test_wrapped_run_binds_to_the_named_message(database: str, tmp_path: Any) -> None:
    async with _hosted(database, tmp_path) as (host, p):
        cid, mid = await host.new_conversation(), new_id()
        async with track_workflow("chat", conversation_id=cid, message_id=mid):
            out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Oslo")]})
        other = await host.save_assistant(cid, "unrelated note")  # not the named message
        await host.save_assistant(cid, str(out["messages"][-1].content), message_id=mid)
        await _flush(p)
        by_id = {m.id: m for m in await host.messages(cid)}
        assert by_id[other].total_tokens == 0  # the app's zeros stay where they belong
        assert by_id[mid].total_tokens > 0
        conv = await host.conversation(cid)
        assert conv.total_tokens == by_id[mid].total_tokens and conv.message_count == 2


async def test_graph_metadata_names_the_message(database: str, tmp_path: Any) -> None:
    """Unwrapped, but the graph's config names the message (``metadata.message_id``): the row
    with that id is filled, not the first assistant row saved after the run."""
    async with _hosted(database, tmp_path) as (host, p):
        cid, mid = await host.new_conversation(), new_id()
        config = {"configurable": {"thread_id": cid}, "metadata": {"message_id": mid}}
        out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Oslo")]}, config)
        other = await host.save_assistant(cid, "a note saved first")
        await host.save_assistant(cid, str(out["messages"][-1].content), message_id=mid)
        await _flush(p)
        by_id = {m.id: m for m in await host.messages(cid)}
        ledger = await host.rows(LEDGER)
        assert by_id[other].total_tokens == 0
        assert by_id[mid].total_tokens == sum(r.total_tokens for r in ledger) > 0
        assert {r.message_id for r in ledger} == {mid}
        assert (await host.conversation(cid)).total_tokens == by_id[mid].total_tokens


async def test_streaming_run_without_a_message(database: str, tmp_path: Any) -> None:
    async with _hosted(database, tmp_path, grace_s=0.3) as (host, p):
        cid = await host.new_conversation()
        await host.stream(cid, "What is the weather in Tokyo?")
        await _until_applied(host, p, cid)  # the grace period passes, the worker applies the run
        conv = await host.conversation(cid)
        ledger = await host.rows(LEDGER)
        assert conv.total_tokens == sum(r.total_tokens for r in ledger) > 0
        assert conv.message_count == 0 and await host.messages(cid) == []


async def test_a_message_saved_after_the_sweep_took_its_run_adds_nothing_again(
    database: str, tmp_path: Any
) -> None:
    """The worker added a run to its conversation after ``grace_s``; the app saves the run's
    message later. Its transaction fills the message and writes the run's rows, but finds the
    run claimed: the conversation is not added to twice."""
    async with _hosted(database, tmp_path, grace_s=0.3) as (host, p):
        cid = await host.new_conversation()
        out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Oslo")]},
                                       {"configurable": {"thread_id": cid}})  # fmt: skip
        await _until_applied(host, p, cid)
        added = (await host.conversation(cid)).total_tokens
        await host.save_assistant(cid, str(out["messages"][-1].content))
        await _flush(p)
        assert p.stats["in_transaction"] == 1  # written in the app's transaction, unclaimed
        (msg,) = await host.messages(cid)
        assert msg.total_tokens == added == sum(r.total_tokens for r in await host.rows(LEDGER))
        conv = await host.conversation(cid)
        assert (conv.total_tokens, conv.total_cost) == (added, msg.cost)


async def test_a_message_saved_after_the_worker_wrote_its_run_claims_it(
    database: str, tmp_path: Any
) -> None:
    """The worker wrote the run's rows (unclaimed) before the app saved its message: the app's
    transaction claims the existing row (the upsert's update) and adds it, once."""
    async with _hosted(database, tmp_path) as (host, p):
        cid = await host.new_conversation()
        out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Quito")]},
                                       {"configurable": {"thread_id": cid}})  # fmt: skip
        await _flush(p)
        (run,) = await host.rows(RUNS)
        assert run.applied_at is None and (await host.conversation(cid)).total_tokens == 0
        await host.save_assistant(cid, str(out["messages"][-1].content))
        await _flush(p)
        assert p.stats["in_transaction"] == 1
        (msg,) = await host.messages(cid)
        assert msg.total_tokens == sum(r.total_tokens for r in await host.rows(LEDGER)) > 0
        conv = await host.conversation(cid)
        assert (conv.total_tokens, conv.total_cost) == (msg.total_tokens, msg.cost)
        (run,) = await host.rows(RUNS)
        assert run.applied_at is not None and run.message_id == msg.id


async def test_failed_run_records_status_and_invents_nothing(database: str, tmp_path: Any) -> None:
    async with _hosted(database, tmp_path) as (host, p):
        cid = await host.new_conversation()
        with pytest.raises(RuntimeError):
            async with track_workflow("chat", conversation_id=cid):
                raise RuntimeError("the model provider is down")
        await _flush(p)
        (run,) = await host.rows(RUNS)
        assert run.status == "error" and run.total_tokens is None and run.cost is None
        assert await host.rows(LEDGER) == []
        assert (await host.conversation(cid)).total_tokens == 0


async def test_fifty_concurrent_chats_into_one_conversation(database: str, tmp_path: Any) -> None:
    async with _hosted(database, tmp_path) as (host, p):
        cid = await host.new_conversation()
        cities = ["Paris", "Oslo", "Tokyo", "Lima", "Rome"]
        await asyncio.gather(
            *(host.chat(cid, f"weather in {cities[i % 5]} {i}") for i in range(50))
        )
        await _flush(p)
        msgs = await host.messages(cid)
        assert len(msgs) == 50 and all(m.total_tokens and m.total_tokens > 0 for m in msgs)
        conv = await host.conversation(cid)
        assert conv.message_count == 50
        assert conv.total_tokens == sum(m.total_tokens for m in msgs)
        assert float(conv.total_cost) == pytest.approx(sum(float(m.cost) for m in msgs), abs=1e-8)
        runs = await host.rows(RUNS)
        assert len(runs) == 50 and len({r.message_id for r in runs}) == 50
        assert len(await host.rows(LEDGER)) == 100


async def test_database_outage_then_recovery_and_restart(tmp_path: Any) -> None:
    """PostgreSQL: the ledger's database is unreachable (it does not exist yet) while runs
    happen; records are spooled; the process restarts; the database comes back; the spool is
    applied exactly once."""
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    url = PG.format(db=name)
    tel, p = await _configure(url, tmp_path, grace_s=0.2)
    graph = build_chat_graph()
    cid = new_id()
    try:
        for i in range(3):  # streaming-style runs: no message, totals from the ledger
            await graph.ainvoke({"messages": [HumanMessage(f"weather in Oslo {i}")]},
                                {"configurable": {"thread_id": cid}})  # fmt: skip
        for _ in range(300):
            if p.stats["spooled"] >= 9 and p.stats["failures"]:
                break
            await asyncio.sleep(0.05)
        assert p.stats["spooled"] >= 9 and p.stats["failures"] >= 1  # 3 runs x (2 llm + 1 run)
    finally:
        tel.shutdown()  # the process "stops" with a non-empty spool
    await _pg_admin(f"CREATE DATABASE {name}")
    try:
        host = Host(url)
        await host.setup()
        async with host.sessions() as s:
            s.add(Conversation(id=cid, total_tokens=0, total_cost=0, message_count=0))
            await s.commit()
        for _ in range(2):  # restarted twice: the second replay must change nothing
            tel, p = await _configure(url, tmp_path, grace_s=0.2)
            try:
                await _until_applied(host, p, cid)
                await asyncio.sleep(0.5)
                await _flush(p)
            finally:
                tel.shutdown()
        ledger = await host.rows(LEDGER)
        assert len(ledger) == 6
        runs = await host.rows(RUNS)
        assert len(runs) == 3 and all(r.applied_at is not None for r in runs)
        conv = await host.conversation(cid)
        assert conv.total_tokens == sum(r.total_tokens for r in ledger)
        async with host.engine.connect() as conn:
            spooled = await conn.execute(select(func.count()).select_from(LEDGER))
            assert spooled.scalar_one() == 6
        await host.engine.dispose()
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_own_sql_is_not_traced_as_app_work(tmp_path: Any) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    host = Host(url)
    await host.setup()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # the app's engine, and every engine created from now on (the ledger's worker included)
    SQLAlchemyInstrumentor().instrument(
        engine=host.engine.sync_engine, tracer_provider=provider, skip_dep_check=True
    )  # the contrib package declares SQLAlchemy < 2.1; it works on 2.1
    p = UsagePersistence(url, spool_path=tmp_path / "spool.db")
    tel = configure(tracer_provider=provider, persistence=p, prices=LOCAL_MODEL_PRICES)
    try:
        assert p.writes_in_transaction  # the app's tables were there before configure()
        cid = await host.new_conversation()
        await host.chat(cid, "weather in Rome")
        await _flush(p)
        sql = [s for s in exporter.get_finished_spans() if "db.statement" in (s.attributes or {})]
        statements = " ".join(s.attributes["db.statement"] for s in sql)
        assert "INSERT INTO messages" in statements  # the app's own queries are traced
        assert "chatter_usage" not in statements  # ours never are
        assert "SAVEPOINT" not in statements  # nor the savepoint around them
        assert p.stats["in_transaction"] == 1  # they ran on the app's connection
        ledger = await host.rows(LEDGER)
        assert (
            (await host.conversation(cid)).total_tokens == sum(r.total_tokens for r in ledger) > 0
        )
    finally:
        tel.shutdown()
        SQLAlchemyInstrumentor().uninstrument()
        await host.engine.dispose()


class _Proxy:
    """A TCP proxy on loopback in front of PostgreSQL that a test can cut and restore: a real
    outage as the ledger's driver sees it (connections reset, new ones refused)."""

    def __init__(self, port: int = PG_PORT) -> None:
        self.target = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        self.writers: set[Any] = set()
        self.port = 0
        self.restore()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader: Any, writer: Any) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: Any, writer: Any) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    def restore(self) -> None:
        self._run(self._start())

    def cut(self) -> None:
        self._run(self._cut())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)


class _CutAfterFirstLLMCall(BaseCallbackHandler):
    def __init__(self, proxy: _Proxy) -> None:
        self.proxy, self.done = proxy, False

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        if not self.done:
            self.done = True
            self.proxy.cut()


def _metric(reader: InMemoryMetricReader, name: str) -> Any:
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    return metric.data.data_points[0].value
    return None


async def test_database_outage_in_the_middle_of_a_run(
    tmp_path: Any, caplog: Any, monkeypatch: Any
) -> None:
    """PostgreSQL through a proxy that is cut after the first LLM call of a run: the app keeps
    working, its message is filled and its run accounted (in its own transaction); the ledger
    spools what it must write, says so in a log line and a metric, and applies nothing twice
    when the database is back."""
    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())  # this test's log lines
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    proxy = _Proxy()
    host = Host(PG.format(db=name))  # the app talks to its database directly
    reader = InMemoryMetricReader()
    p = UsagePersistence(f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{name}",
                         spool_path=tmp_path / "spool.db", grace_s=0.2)  # fmt: skip
    tel = configure(tracer_provider=TracerProvider(), persistence=p, prices=LOCAL_MODEL_PRICES,
                    meter_provider=MeterProvider(metric_readers=[reader]))  # fmt: skip
    try:
        await host.setup()
        cid = await host.new_conversation()
        first = await host.chat(cid, "weather in Paris")
        await _flush(p)
        before = (await host.conversation(cid)).total_tokens
        assert before > 0

        cutter = _CutAfterFirstLLMCall(proxy)
        out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Oslo")]},
                                       {"callbacks": [cutter]})  # fmt: skip
        assert cutter.done
        second = await host.save_assistant(cid, str(out["messages"][-1].content))
        # That run was written and committed in the app's transaction: the worker has nothing
        # of it to write. A run no message takes (a streamed answer) it must write, into the
        # outage.
        await host.graph.ainvoke({"messages": [HumanMessage("weather in Rome")]})
        for _ in range(300):
            if p.stats["failures"] and p.stats["spooled"]:
                break
            await asyncio.sleep(0.05)
        assert p.stats["failures"] >= 1 and p.stats["spooled"] >= 1
        assert _metric(reader, "chatter.usage.ledger.spooled") == p.stats["spooled"]
        assert "usage ledger cannot write to the database" in caplog.text
        by_id = {m.id: m for m in await host.messages(cid)}
        assert by_id[second].total_tokens > 0  # filled in the app's transaction all the same
        # ...and the run's ledger rows and conversation delta committed with it: the app's
        # database is up even though the ledger's connection to it is cut
        total = before + by_id[second].total_tokens
        assert (await host.conversation(cid)).total_tokens == total
        assert p.stats["in_transaction"] >= 1

        proxy.restore()
        await _flush(p)
        assert "usage ledger reached the database again" in caplog.text
        conv = await host.conversation(cid)
        assert conv.total_tokens == by_id[first].total_tokens + by_id[second].total_tokens
        assert conv.message_count == 2
        assert len(await host.rows(LEDGER)) == 6
        runs = await host.rows(RUNS)
        assert sorted(map(str, (r.message_id for r in runs))) == sorted(
            [first, second, "None"])  # fmt: skip
        assert _metric(reader, "chatter.usage.ledger.spooled") == 0
        assert _metric(reader, "chatter.usage.ledger.written") == p.stats["written"] >= 6
    finally:
        tel.shutdown()
        proxy.close()
        await host.engine.dispose()
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_a_full_spool_drops_and_counts(tmp_path: Any, caplog: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())
    reader = InMemoryMetricReader()
    url = PG.format(db=f"chatter_missing_{uuid.uuid4().hex[:8]}")  # never created: down
    p = UsagePersistence(url, spool_path=tmp_path / "spool.db", max_spool=5)
    tel = configure(tracer_provider=TracerProvider(), persistence=p, prices=LOCAL_MODEL_PRICES,
                    meter_provider=MeterProvider(metric_readers=[reader]))  # fmt: skip
    try:
        graph = build_chat_graph()
        for i in range(3):  # 3 runs x (2 LLM calls + 1 run) = 9 records, room for 5
            await graph.ainvoke({"messages": [HumanMessage(f"weather in Lima {i}")]})
        for _ in range(300):
            if p.stats["dropped"] + p.stats["spooled"] == 9:
                break
            await asyncio.sleep(0.05)
        assert (p.stats["spooled"], p.stats["dropped"]) == (5, 4)
        assert _metric(reader, "chatter.usage.ledger.dropped") == 4
        assert "is full (5 records)" in caplog.text
    finally:
        tel.shutdown()


async def test_a_named_message_saved_before_the_run_ends(database: str, tmp_path: Any) -> None:
    """The app saves its placeholder row (zeros) first and runs the graph afterwards, inside
    ``track_workflow(message_id=...)``: the worker fills that row where it is still empty."""
    async with _hosted(database, tmp_path, grace_s=0.3) as (host, p):
        cid, mid = await host.new_conversation(), new_id()
        async with track_workflow("chat", conversation_id=cid, message_id=mid):
            await host.save_assistant(cid, "", message_id=mid)
            await host.graph.ainvoke({"messages": [HumanMessage("weather in Rome")]})
        for _ in range(300):  # no binding comes: the grace period passes, the worker fills it
            await _flush(p)
            if (await host.messages(cid))[0].total_tokens:
                break
            await asyncio.sleep(0.1)
        (msg,) = await host.messages(cid)
        ledger = await host.rows(LEDGER)
        assert msg.total_tokens == sum(r.total_tokens for r in ledger) > 0
        assert msg.prompt_tokens + msg.completion_tokens == msg.total_tokens
        assert (msg.provider_used, msg.model_used) == ("chatter.local", "chatter-local-1")
        assert msg.finish_reason == "stop" and msg.response_time_ms is not None
        conv = await host.conversation(cid)
        assert (conv.total_tokens, conv.message_count) == (msg.total_tokens, 1)


async def test_no_database_io_on_the_request_path(database: str, tmp_path: Any) -> None:
    """The app's thread runs nothing of ours outside its own transaction: no read, no
    connection of ours. Inside it, right after the app's message insert and on the app's own
    connection, the run's ledger rows, its claim and its conversation delta (atomic with the
    app's commit). Everything else on the ledger's tables runs on its worker thread."""
    seen: list[tuple[str, str]] = []
    conns: list[tuple[str, int, str]] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append((threading.current_thread().name, statement))
        conns.append((threading.current_thread().name, id(conn.connection), statement))

    event.listen(Engine, "before_cursor_execute", record)
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path)
    try:
        cid = await host.new_conversation()
        await asyncio.gather(*(host.chat(cid, f"weather in Paris {i}") for i in range(5)))
        await _flush(p)
    finally:
        tel.shutdown()
        event.remove(Engine, "before_cursor_execute", record)
        await host.engine.dispose()
    ours = {t for t, sql in seen if "chatter_usage" in sql}
    assert "chatter-otel-ledger" in ours  # replays (idempotent), sweeps, on the worker
    app_thread = [(c, sql) for t, c, sql in conns if t != "chatter-otel-ledger"]
    assert sum("INSERT INTO messages" in sql for _, sql in app_thread) == 5
    mine = [(c, sql) for c, sql in app_thread if "chatter_" in sql]
    if database.startswith("postgresql"):
        # per chat: one call of the write function, which writes and reads nothing back
        assert [sql.split("(")[0] for _, sql in mine] == [
            f'SELECT "public".{function_name(MessageMapping())}'] * 5  # fmt: skip
    else:
        # per chat: one insert into the view whose trigger writes, nothing read
        assert [sql.split("(")[0] for _, sql in mine] == [
            f'INSERT INTO "{view_name(MessageMapping())}" VALUES'] * 5  # fmt: skip
    for i, (conn, sql) in enumerate(app_thread):  # each on the connection of a message insert
        if "chatter_" in sql:
            before = [c for c, s in app_thread[:i] if "INSERT INTO messages" in s]
            assert conn in before


async def test_an_app_that_keeps_its_own_totals_is_not_counted_twice(
    database: str, tmp_path: Any
) -> None:
    """Like the reference app: it names the message, writes the run's usage itself and adds it
    to the conversation itself. The ledger records the run and claims it without a delta."""
    async with _hosted(database, tmp_path, grace_s=0.2) as (host, p):
        cid, mid = await host.new_conversation(), new_id()
        async with track_workflow("chat", conversation_id=cid, message_id=mid) as run:
            await host.graph.ainvoke({"messages": [HumanMessage("weather in Paris")]})
        u = run.usage
        async with host.sessions() as s:
            s.add(Message(id=mid, conversation_id=cid, role=Role.ASSISTANT, content="...",
                          sequence_number=1, prompt_tokens=u.prompt_tokens,
                          completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                          cost=u.cost))  # fmt: skip
            await s.execute(
                update(Conversation)
                .where(Conversation.id == cid)
                .values(
                    total_tokens=Conversation.total_tokens + u.total_tokens,
                    total_cost=Conversation.total_cost + u.cost,
                    message_count=Conversation.message_count + 1,
                )
            )
            await s.commit()
        await _flush(p)
        await asyncio.sleep(0.5)  # past the grace period: the sweep must not apply it either
        await _flush(p)
        conv = await host.conversation(cid)
        assert conv.total_tokens == u.total_tokens > 0
        (row,) = await host.rows(RUNS)
        assert row.applied_at is not None and row.message_id == mid
        (msg,) = await host.messages(cid)
        assert msg.model_used == "chatter-local-1"  # the columns it left empty are filled


async def test_chat_openai_streamed_over_http_lands_in_the_conversation(
    database: str, tmp_path: Any, openai_server: Any
) -> None:
    """A real ``ChatOpenAI`` (streamed, ``stream_usage=True``) against an OpenAI-compatible
    server on loopback, run by the host's streaming endpoint, which saves no message."""
    from langchain_openai import ChatOpenAI

    host = Host(database)
    host.graph = build_chat_graph(
        ChatOpenAI(model="gpt-4o-mini", base_url=openai_server.url, api_key="sk-loopback",
                   max_retries=0, streaming=True, stream_usage=True)
    )  # fmt: skip
    await host.setup()
    tel, p = await _configure(database, tmp_path, grace_s=0.2)
    try:
        cid = await host.new_conversation()
        await host.stream(cid, "Say hello")
        await _until_applied(host, p, cid)
        (row,) = await host.rows(LEDGER)
        assert (row.provider, row.model) == ("openai", openai_server.model)
        assert (row.input_tokens, row.output_tokens, row.cache_read_tokens) == (23, 7, 4)
        assert (row.currency, row.cost_source, row.finish_reason) == ("USD", "local", "stop")
        assert row.conversation_id == cid and row.status == "ok"
        conv = await host.conversation(cid)
        assert conv.total_tokens == 30 and row.cost > 0
        assert float(conv.total_cost) == _approx(row.cost)
    finally:
        tel.shutdown()
        await host.engine.dispose()


def _llm_record(span_id: str, **overrides: Any) -> dict[str, Any]:
    """A ledger record as the span processor submits it."""
    record = {
        "span_id": span_id, "trace_id": "ab" * 16, "workflow_id": None, "conversation_id": "c",
        "message_id": None, "correlation_id": None, "user_id": None, "provider": "openai",
        "model": "gpt-4o-mini", "input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
        "cache_read_tokens": None, "cache_creation_tokens": None, "reasoning_tokens": None,
        "cost": Decimal("0.000001"), "currency": "USD", "cost_source": "local",
        "finish_reason": "stop", "started_at": 1.0, "duration_ms": 2.0, "status": "ok",
    }  # fmt: skip
    record.update(overrides)
    return record


async def test_a_record_the_database_refuses_is_quarantined_and_the_rest_flow(
    database: str, tmp_path: Any, caplog: Any, monkeypatch: Any
) -> None:
    """One record the database refuses (here: NOT NULL) must not hold up those behind it; it is
    kept aside with the error, logged and counted. Over-long strings (a hostile header's id) are
    cut to the column, not refused (PostgreSQL would refuse them)."""
    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())
    host = Host(database)
    await host.setup()
    reader = InMemoryMetricReader()
    p = UsagePersistence(database, spool_path=tmp_path / "spool.db")
    tel = configure(tracer_provider=TracerProvider(), persistence=p, prices=LOCAL_MODEL_PRICES,
                    meter_provider=MeterProvider(metric_readers=[reader]))  # fmt: skip
    try:
        p.submit("llm", _llm_record("00000000000000aa", trace_id=None))
        p.submit("llm", _llm_record("00000000000000bb", conversation_id="x" * 5000))
        cid = await host.new_conversation()
        await host.chat(cid, "weather in Paris")
        await _flush(p)
        ledger = {r.span_id: r for r in await host.rows(LEDGER)}
        assert "00000000000000aa" not in ledger
        assert ledger["00000000000000bb"].conversation_id == "x" * 256
        chat = [r for r in ledger.values() if r.conversation_id == cid]
        assert len(ledger) == 3 and len(chat) == 2  # the chat's two LLM calls went through
        assert (await host.conversation(cid)).total_tokens == sum(r.total_tokens for r in chat) > 0
        assert p.stats["quarantined"] == 1
        assert _metric(reader, "chatter.usage.ledger.quarantined") == 1
        assert "the usage database refused a llm record" in caplog.text
        with sqlite3.connect(tmp_path / "spool.db") as db:
            ((kind, payload, error),) = db.execute("SELECT kind, payload, error FROM quarantine")
            (pending,) = db.execute("SELECT COUNT(*) FROM spool").fetchone()
        assert kind == "llm" and json.loads(payload)["span_id"] == "00000000000000aa"
        assert "trace_id" in error and pending == 0
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_usage_database_without_the_apps_tables_until_the_app_creates_them(
    tmp_path: Any, caplog: Any, monkeypatch: Any
) -> None:
    """The conversations table is not there (a wrong mapping, or the app creates it later): the
    ledger keeps writing, says so once, and does not retry the batch forever; once the table
    exists, totals are applied again."""
    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    host = Host(url)
    tel, p = await _configure(url, tmp_path, grace_s=0.2)
    try:
        await host.stream("CONV-NOT-YET", "weather in Rome")
        for _ in range(300):
            await _flush(p)
            if p.stats["applied"]:
                break
            await asyncio.sleep(0.05)
        (run,) = await host.rows(RUNS)
        ledger = await host.rows(LEDGER)
        assert run.applied_at is not None and len(ledger) == 2
        assert run.total_tokens == sum(r.total_tokens for r in ledger) > 0
        assert p.stats["failures"] == 0
        assert "conversation totals are not updated until it is" in caplog.text
        assert "'conversations'" in caplog.text

        await host.setup()
        cid = await host.new_conversation()
        await asyncio.sleep(1.1)  # the worker looks for the app's tables again once a second
        await host.stream(cid, "weather in Rome")
        await _until_applied(host, p, cid)
        runs = [r for r in await host.rows(RUNS) if r.conversation_id == cid]
        assert (await host.conversation(cid)).total_tokens == runs[0].total_tokens > 0
    finally:
        tel.shutdown()
        await host.engine.dispose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:///usage.db", "needs an async driver"),
        ("postgresql+psycopg2://postgres@127.0.0.1/test", "needs an async driver"),
        ("mysql+aiomysql://root@127.0.0.1/app", "supports PostgreSQL and SQLite, not 'mysql'"),
    ],
)
def test_an_unsupported_database_url_is_refused_at_startup(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        UsagePersistence(url)


async def test_two_workers_share_one_spool_file(database: str, tmp_path: Any) -> None:
    """Two worker processes left on the default spool path: each may write the other's records;
    primary keys keep them once, and each one's flush() still returns."""
    host = Host(database)
    await host.setup()
    first = UsagePersistence(database, spool_path=tmp_path / "shared.db", batch_delay_s=0.05)
    second = UsagePersistence(database, spool_path=tmp_path / "shared.db", batch_delay_s=0.05)
    first.start()
    second.start()
    try:
        for i in range(300):
            (first if i % 2 else second).submit("llm", _llm_record(f"{i:016x}"))
        assert await asyncio.to_thread(first.flush, 20), first.stats
        assert await asyncio.to_thread(second.flush, 20), second.stats
        ledger = await host.rows(LEDGER)
        assert sorted(r.span_id for r in ledger) == [f"{i:016x}" for i in range(300)]
        assert first.stats["spooled"] == second.stats["spooled"] == 0
        assert first.stats["written"] + second.stats["written"] >= 300
    finally:
        first.close()
        second.close()
        await host.engine.dispose()


async def test_a_locked_spool_file_holds_no_record_back(
    database: str, tmp_path: Any, caplog: Any, monkeypatch: Any
) -> None:
    """Another process holds the spool file locked, first while the worker opens it, then while
    it writes a batch: the worker says so and the records go straight to the database meanwhile
    (a locked spool used to hold them back, and once killed the worker); all written once."""
    monkeypatch.setattr(_safety, "_limiter", _safety._RateLimiter())
    monkeypatch.setattr(spool, "SPOOL_BUSY_S", 0.1)
    host = Host(database)
    await host.setup()
    path = tmp_path / "spool.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # a fresh file: the worker cannot even switch it to WAL
    p = UsagePersistence(database, spool_path=path, batch_delay_s=0.05)
    p.start()
    try:
        p.submit("llm", _llm_record("0000000000000001"))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        assert "usage spool at" in caplog.text and "cannot be opened" in caplog.text
        assert "go straight to the database" in caplog.text
        other.execute("COMMIT")
        await asyncio.sleep(2.1)  # the spool is tried again every 2 s: now it opens
        p.submit("llm", _llm_record("0000000000000002"))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        assert "can be written again" in caplog.text

        other.execute("BEGIN IMMEDIATE")  # now the worker has it open; hold the write lock
        for i in range(3, 12):
            p.submit("llm", _llm_record(f"{i:016x}"))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        other.execute("COMMIT")

        ledger = await host.rows(LEDGER)
        assert sorted(r.span_id for r in ledger) == [f"{i:016x}" for i in range(1, 12)]
        assert (p.stats["dropped"], p.stats["spooled"], p.stats["written"]) == (0, 0, 11)
    finally:
        other.close()
        p.close()
        await host.engine.dispose()


async def test_the_app_s_transaction_carries_one_statement_of_ours(
    database: str, tmp_path: Any
) -> None:
    """The run's call rows, its claim and its conversation's totals are one statement on the
    app's connection: a call of our function on PostgreSQL (inside a savepoint on a
    connection's first), an insert into our view on SQLite (its trigger writes). From the
    second chat on, SQLAlchemy serves it from its compiled cache."""
    from sqlalchemy import event
    from sqlalchemy.engine.default import CACHE_HIT

    replayed: list[str] = []

    def worker(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name == "chatter-otel-ledger" and "INSERT" in statement:
            replayed.append(statement)

    # batch_delay_s: the worker reads the spooled records at the flush, after each commit
    async with _hosted(database, tmp_path, batch_delay_s=3600.0) as (host, p):
        event.listen(Engine, "before_cursor_execute", worker)
        for turn in range(2):
            cid = await host.new_conversation()
            out = await host.graph.ainvoke({"messages": [HumanMessage("weather in Lima")]},
                                           {"configurable": {"thread_id": cid}})  # fmt: skip
            ours: list[tuple[str, Any]] = []

            def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                     many: bool) -> None:  # fmt: skip
                # ours name our tables, or quote the app's (its own ORM statements do not)
                if "chatter_" in statement or 'UPDATE "conversations"' in statement or (
                        "SAVEPOINT" in statement):  # fmt: skip
                    ours.append((statement, context.cache_hit))  # noqa: B023 - this turn's

            event.listen(host.engine.sync_engine, "before_cursor_execute", seen)
            try:
                mid = await host.save_assistant(cid, str(out["messages"][-1].content))
            finally:
                event.remove(host.engine.sync_engine, "before_cursor_execute", seen)
            assert p.stats["in_transaction"] == turn + 1
            if host.engine.dialect.name == "postgresql":
                # One call of our function; on a connection's first, inside a savepoint.
                calls = [s for s, _ in ours if "chatter_otel_write_" in s]
                assert len(calls) == 1 and calls[0].startswith('SELECT "public".chatter_otel')
                assert [s for s, _ in ours] == (calls if turn else
                                                ["SAVEPOINT sa_savepoint_1", calls[0],
                                                 "RELEASE SAVEPOINT sa_savepoint_1"])  # fmt: skip
            else:  # nothing else: no savepoint (SQLite undoes a refused statement alone)
                assert [s.split("(")[0] for s, _ in ours] == [
                    f'INSERT INTO "{view_name(MessageMapping())}" VALUES']  # fmt: skip
            if turn == 1 and _SQLALCHEMY >= (2, 1):
                # SQLAlchemy 2.0 (2.0.30, the lowest we support) cannot cache these statements
                # (NO_CACHE_KEY on PostgreSQL; one of three on SQLite): there they are compiled
                # on every chat, correct and slower. 2.1 serves every one from its cache.
                hits = [hit for s, hit in ours if "SAVEPOINT" not in s]  # plain strings
                assert hits == [CACHE_HIT] * (len(ours) - 2 * (len(hits) != len(ours)))
            await _flush(p)
            ledger = [r for r in await host.rows(LEDGER) if r.message_id == mid]
            (msg,) = await host.messages(cid)
            assert msg.id == mid and msg.total_tokens == sum(r.total_tokens for r in ledger) > 0
            conv = await host.conversation(cid)
            assert conv.total_tokens == msg.total_tokens and conv.total_cost == msg.cost
            assert len(ledger) == 2  # the graph's two chat calls
            run = next(r for r in await host.rows(RUNS) if r.message_id == mid)
            assert run.applied_at is not None
        event.remove(Engine, "before_cursor_execute", worker)
        # What the app's transactions wrote and committed, the worker did not write again.
        assert replayed == []
        assert p.stats["written"] == 6 and p.stats["spooled"] == 0  # 2 runs, 4 calls


@pytest.mark.parametrize("create_tables", [True, False], ids=["upgraded", "app-managed"])
async def test_a_ledger_table_of_an_older_release_is_upgraded(
    database: str, tmp_path: Any, create_tables: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Every ledger row names the price table its cost came from and whether its usage was
    estimated. A ledger table made before those columns existed gets them (or, where the app
    manages the schema, is written without them and one line says which statement adds each):
    no row is lost either way."""
    added = ("price_table", "usage_estimated")
    from sqlalchemy import Column, MetaData, Table, inspect

    old = MetaData()
    Table(LEDGER.name, old, *(Column(c.name, c.type, primary_key=c.primary_key)
                              for c in LEDGER.columns if c.name not in added))  # fmt: skip
    old_release_runs(old)
    host = Host(database)
    await host.setup()
    async with host.engine.begin() as conn:
        await conn.run_sync(old.create_all)
    await host.engine.dispose()
    async with _hosted(database, tmp_path, create_tables=create_tables) as (host2, p):
        cid = await host2.new_conversation()
        await host2.chat(cid, "weather in Quito")
        await _flush(p)
        async with host2.engine.connect() as conn:
            ledger = list(
                await conn.execute(
                    select(*(c for c in LEDGER.columns if create_tables or c.name not in added))
                )
            )
        assert len(ledger) == 2 and sum(r.total_tokens for r in ledger) > 0
        async with host2.engine.connect() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns(LEDGER.name)}
            )
        async with host2.engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {ix["name"] for ix in inspect(c).get_indexes(RUNS.name)}
            )
        # ours are added where we manage the schema; an app-managed one is left as it is
        assert ("ix_chatter_usage_runs_unapplied" in indexes) is create_tables
        if create_tables:
            assert set(added) <= columns
            assert {r.usage_estimated for r in ledger} == {False}  # measured by the provider
            assert {r.price_table for r in ledger} == {
                next(iter({r.price_table for r in ledger}))
            } and ledger[0].price_table.startswith(
                "override "
            )  # the reference model is priced by the app's table
        else:
            assert not set(added) & columns
            for name in added:
                assert f"ALTER TABLE chatter_usage_ledger ADD COLUMN {name}" in caplog.text
        assert p.stats["dropped"] == 0 and p.stats["quarantined"] == 0


def test_the_committed_rows_kept_for_the_worker_are_bounded() -> None:
    """The ids of rows the app's transactions wrote are kept only until the worker has seen
    their spooled records, and never more than the bound: an id that falls out is replayed
    (ON CONFLICT DO NOTHING), which changes nothing."""
    from chatter_otel.persistence.committed import CommittedRows

    kept = CommittedRows(limit=100)
    for i in range(10_000):
        kept.add(f"w{i}", [f"a{i}", f"b{i}"])
    assert len(kept._ids) == 100
    rows = [(1, "run", {"workflow_id": "w9999"}), (2, "llm", {"span_id": "b9999"}),
            (3, "llm", {"span_id": "a0"}), (4, "bind", {"workflow_id": "w9999"})]  # fmt: skip
    assert kept.unwritten(rows) == [rows[2], rows[3]]  # a0 fell out; binds always go through
    assert kept.unwritten(rows) == [rows[0], rows[1], rows[2], rows[3]]  # each seen once
    assert (kept.skipped, len(kept._ids)) == (2, 98)
    # Ids the worker never asks about (it read their records before the commit) age out.
    aging = CommittedRows(limit=100, max_age_s=0.2)
    aging.add("w-old", ["s-old"])
    time.sleep(0.3)
    aging.add("w-new", ["s-new"])
    assert list(aging._ids) == [("run", "w-new"), ("llm", "s-new")]
