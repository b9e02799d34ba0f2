"""Usage lands in a host app's messages and conversations, on real PostgreSQL and on SQLite.

The host app is reproduced as it really behaves: it runs the graph, then (same task) inserts the
assistant message with zeros in the usage columns and updates its aggregates with +0; its
streaming endpoint saves no message at all. It never tells anyone the message id in advance.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import (
    Engine,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    event,
    func,
    select,
    update,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chatter_otel import _safety, configure, track_workflow
from chatter_otel.demo import build_chat_graph
from chatter_otel.local_model import LOCAL_MODEL_PRICES
from chatter_otel.persistence import LEDGER, RUNS, UsagePersistence

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/{db}"


class Base(DeclarativeBase):
    pass


class Role(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    total_cost: Mapped[Decimal] = mapped_column(Numeric(18, 10), default=0, nullable=False)
    message_count: Mapped[int] = mapped_column(Integer, default=0, nullable=False)


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"))
    role: Mapped[Role] = mapped_column(SAEnum(Role))
    content: Mapped[str] = mapped_column(Text)
    sequence_number: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 10))
    provider_used: Mapped[str | None] = mapped_column(String(64))
    model_used: Mapped[str | None] = mapped_column(String(128))
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    response_time_ms: Mapped[int | None] = mapped_column(Integer)


def new_id() -> str:
    return uuid.uuid4().hex[:26].upper()


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: Any, tmp_path: Any) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/app.db"
        return
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    try:
        yield PG.format(db=name)
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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


async def _configure(url: str, tmp_path: Any, **kw: Any) -> tuple[Any, UsagePersistence]:
    persistence = UsagePersistence(url, spool_path=tmp_path / "spool.db", **kw)
    tel = configure(tracer_provider=TracerProvider(), persistence=persistence,
                    prices=LOCAL_MODEL_PRICES)  # fmt: skip
    return tel, persistence


async def _flush(p: UsagePersistence) -> None:
    assert await asyncio.to_thread(p.flush, 20), p.stats


def _approx(value: Any) -> Any:
    return pytest.approx(float(value), abs=1e-9)


async def test_unwrapped_run_fills_the_message_and_the_totals(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path)
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
        (run,) = await host.rows(RUNS)
        assert run.message_id == mid and run.applied_at is not None and run.status == "ok"
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_wrapped_run_binds_to_the_named_message(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path)
    try:
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
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_streaming_run_without_a_message(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path, grace_s=0.3)
    try:
        cid = await host.new_conversation()
        await host.stream(cid, "What is the weather in Tokyo?")
        for _ in range(100):  # the grace period passes, the worker applies the run
            await _flush(p)
            if (await host.conversation(cid)).total_tokens:
                break
            await asyncio.sleep(0.1)
        conv = await host.conversation(cid)
        ledger = await host.rows(LEDGER)
        assert conv.total_tokens == sum(r.total_tokens for r in ledger) > 0
        assert conv.message_count == 0 and await host.messages(cid) == []
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_failed_run_records_status_and_invents_nothing(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path)
    try:
        cid = await host.new_conversation()
        with pytest.raises(RuntimeError):
            async with track_workflow("chat", conversation_id=cid):
                raise RuntimeError("the model provider is down")
        await _flush(p)
        (run,) = await host.rows(RUNS)
        assert run.status == "error" and run.total_tokens is None and run.cost is None
        assert await host.rows(LEDGER) == []
        assert (await host.conversation(cid)).total_tokens == 0
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_fifty_concurrent_chats_into_one_conversation(database: str, tmp_path: Any) -> None:
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path)
    try:
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
    finally:
        tel.shutdown()
        await host.engine.dispose()


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
        for _ in range(100):
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
                for _ in range(100):
                    await _flush(p)
                    if (await host.conversation(cid)).total_tokens:
                        break
                    await asyncio.sleep(0.1)
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
    SQLAlchemyInstrumentor().instrument(engine=host.engine.sync_engine, tracer_provider=provider)
    p = UsagePersistence(url, spool_path=tmp_path / "spool.db")
    tel = configure(tracer_provider=provider, persistence=p, prices=LOCAL_MODEL_PRICES)
    try:
        cid = await host.new_conversation()
        await host.chat(cid, "weather in Rome")
        await _flush(p)
        sql = [s for s in exporter.get_finished_spans() if "db.statement" in (s.attributes or {})]
        statements = " ".join(s.attributes["db.statement"] for s in sql)
        assert "INSERT INTO messages" in statements  # the app's own queries are traced
        assert "chatter_usage" not in statements  # ours never are
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

    def __init__(self, port: int = 5432) -> None:
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
    working and its message is filled (in its own transaction); the ledger spools, says so in a
    log line and a metric, and applies everything exactly once when the database is back."""
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
        for _ in range(100):
            if p.stats["failures"] and p.stats["spooled"]:
                break
            await asyncio.sleep(0.05)
        assert p.stats["failures"] >= 1 and p.stats["spooled"] >= 1
        assert _metric(reader, "chatter.usage.ledger.spooled") == p.stats["spooled"]
        assert "usage ledger cannot write to the database" in caplog.text
        by_id = {m.id: m for m in await host.messages(cid)}
        assert by_id[second].total_tokens > 0  # filled in the app's transaction all the same
        assert (await host.conversation(cid)).total_tokens == before  # the delta waits

        proxy.restore()
        await _flush(p)
        assert "usage ledger reached the database again" in caplog.text
        conv = await host.conversation(cid)
        assert conv.total_tokens == by_id[first].total_tokens + by_id[second].total_tokens
        assert conv.message_count == 2
        assert len(await host.rows(LEDGER)) == 4
        runs = await host.rows(RUNS)
        assert {r.message_id for r in runs} == {first, second}
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
        for _ in range(100):
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
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path, grace_s=0.3)
    try:
        cid, mid = await host.new_conversation(), new_id()
        async with track_workflow("chat", conversation_id=cid, message_id=mid):
            await host.save_assistant(cid, "", message_id=mid)
            await host.graph.ainvoke({"messages": [HumanMessage("weather in Rome")]})
        for _ in range(100):  # no binding comes: the grace period passes, the worker fills it
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
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def test_no_database_io_on_the_request_path(database: str, tmp_path: Any) -> None:
    """Every statement on the ledger's tables runs on its worker thread; the app's thread runs
    only the app's own statements (the binding sets attributes, it does not query)."""
    seen: list[tuple[str, str]] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append((threading.current_thread().name, statement))

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
    ours = [t for t, sql in seen if "chatter_usage" in sql]
    assert ours and set(ours) == {"chatter-otel-ledger"}
    app = {t for t, sql in seen if "chatter_usage" not in sql and "conversations" in sql}
    assert "chatter-otel-ledger" in app  # the conversation deltas, on the worker too
    app_thread = [sql for t, sql in seen if t != "chatter-otel-ledger"]
    assert app_thread and not any("chatter_usage" in sql for sql in app_thread)
    # the app's own statements: the conversation insert, then per chat one message insert and
    # its aggregate update; nothing of ours in between
    assert sum("INSERT INTO messages" in sql for sql in app_thread) == 5


async def test_an_app_that_keeps_its_own_totals_is_not_counted_twice(
    database: str, tmp_path: Any
) -> None:
    """Like the reference app: it names the message, writes the run's usage itself and adds it
    to the conversation itself. The ledger records the run and claims it without a delta."""
    host = Host(database)
    await host.setup()
    tel, p = await _configure(database, tmp_path, grace_s=0.2)
    try:
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
    finally:
        tel.shutdown()
        await host.engine.dispose()
