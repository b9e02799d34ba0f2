"""A run's accounting in the app's transaction is one statement
(``chatter_otel/persistence/one_statement.py``), and nothing of ours inside or around it can
abort the app's transaction.

PostgreSQL: one call of the ledger's write function; a refusal inside it undoes only our
writes, and a function missing on the app's connection is met inside a savepoint (the first
call on each connection is guarded; later ones are bare). SQLite: one insert into the ledger's
view, whose trigger writes; SQLite undoes a refused statement alone, and a missing view fails
before anything runs, so there is no savepoint at all."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from chatter_otel.persistence import LEDGER, RUNS, MessageMapping, metadata, write_statement_ddl
from chatter_otel.persistence.one_statement import function_name, view_name
from tests.test_persistence import Host, _configure, _flush, _hosted, database, fresh_pg

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["database"]  # the fixture, shared with test_persistence

REFUSE = (
    """CREATE FUNCTION refuse_the_app() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF current_setting('application_name') = 'refusing-app' THEN
        RAISE EXCEPTION 'refused for the test';
      END IF;
      RETURN NEW;
    END $$""",
    """CREATE TRIGGER refuse_the_app BEFORE INSERT OR UPDATE ON chatter_usage_runs
      FOR EACH ROW EXECUTE FUNCTION refuse_the_app()""",
)


@pytest.fixture
async def pg() -> AsyncIterator[str]:
    async with fresh_pg() as url:
        yield url


@asynccontextmanager
async def _app_then(url: str, tmp_path: Any, *ddl: str) -> AsyncIterator[tuple[Host, Any]]:
    """The host app with the ledger on, then ``ddl`` run on the app's database. The app's
    connections are named ``refusing-app`` (the trigger above refuses only those: the
    ledger's worker, on its own engine, is let through)."""
    host = Host(url)
    host.engine = create_async_engine(
        url, connect_args={"server_settings": {"application_name": "refusing-app"}}
    )
    host.sessions = async_sessionmaker(host.engine, expire_on_commit=False)
    await host.setup()
    tel, p = await _configure(url, tmp_path)
    try:
        assert p.writes_in_transaction
        async with host.engine.begin() as conn:
            for statement in ddl:
                await conn.exec_driver_sql(statement)
        yield host, p
    finally:
        tel.shutdown()
        await host.engine.dispose()


async def _chats_then_totals(
    host: Host, p: Any, statements: list[str], then: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Two chats on one connection: both messages commit although our write was refused;
    (``then`` runs;) the worker writes the runs after the commits, and every total is exact."""
    seen = lambda conn, cursor, sql, *a: statements.append(sql)  # noqa: E731
    event.listen(host.engine.sync_engine, "before_cursor_execute", seen)
    try:
        cid = await host.new_conversation()
        mids = [await host.chat(cid, f"weather in Lima {i}") for i in range(2)]
    finally:
        event.remove(host.engine.sync_engine, "before_cursor_execute", seen)
    assert (p.stats["in_transaction"], p.stats["in_transaction_refused"]) == (0, 2)
    # the app's own statement after ours (its conversation's message_count) ran: the app's
    # transaction was not aborted, and it committed
    assert (await host.conversation(cid)).message_count == 2
    if then is not None:
        await then()
    await _flush(p)
    msgs = await host.messages(cid)
    assert sorted(m.id for m in msgs) == sorted(mids)
    ledger = await host.rows(LEDGER)
    assert sorted(r.message_id for r in ledger) == sorted(mids * 2)  # 2 calls per run
    assert [r.applied_at is not None for r in await host.rows(RUNS)] == [True, True]
    conv = await host.conversation(cid)
    assert conv.total_tokens == sum(m.total_tokens for m in msgs) == sum(
        r.total_tokens for r in ledger) > 0  # fmt: skip
    assert conv.total_cost == sum(m.cost for m in msgs)
    assert p.stats["quarantined"] == 0


async def test_a_refusal_inside_the_function_leaves_the_app_s_transaction_whole(
    pg: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # our runs table refuses the app's connections from now on
    async with _app_then(pg, tmp_path, *REFUSE) as (host, p):
        statements: list[str] = []
        await _chats_then_totals(host, p, statements)
        ours = [s for s in statements if "chatter_otel_write_" in s or "SAVEPOINT" in s]
        call = f'SELECT "public".{function_name(MessageMapping())}(%s, %s, %s, %s, %s)'
        call = call.replace("%s", "$1", 1).replace("%s", "$2", 1).replace("%s", "$3", 1)
        call = call.replace("%s", "$4", 1).replace("%s", "$5", 1)
        # The first call on the connection inside a savepoint (it worked: the function is
        # there, and refused); the second bare, the function's own block undoing our writes.
        assert ours == ["SAVEPOINT sa_savepoint_1", call, "RELEASE SAVEPOINT sa_savepoint_1",
                        call]  # fmt: skip
        assert ("cannot write the run's usage in the app's transaction (DatabaseRefused: "
                "P0001 refused for the test); the ledger's worker writes it after the "
                "commit") in caplog.text  # fmt: skip


async def test_a_function_missing_on_the_app_s_database_is_met_in_a_savepoint(
    pg: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's connection sees no function (dropped here; an app whose engine is another
    database than the ledger's URL is the same case): each first call fails inside its
    savepoint, which is rolled back, and the connection is never taken as proven."""
    caplog.set_level(logging.WARNING, "chatter_otel")
    drop = f"DROP FUNCTION {function_name(MessageMapping())}(text, text, text, text, text)"
    async with _app_then(pg, tmp_path, drop) as (host, p):
        statements: list[str] = []
        await _chats_then_totals(host, p, statements)
        savepoints = [s for s in statements if "SAVEPOINT" in s]
        assert (
            savepoints == ["SAVEPOINT sa_savepoint_1", "ROLLBACK TO SAVEPOINT sa_savepoint_1"] * 2
        )
        assert "UndefinedFunction" in caplog.text or "does not exist" in caplog.text


async def test_the_function_is_made_once_per_body_and_found_by_the_next_process(
    pg: str, tmp_path: Any
) -> None:
    """A second ledger on the same database finds the function there (no DDL of its own);
    its name is that of its body, so another mapping makes another function."""
    host = Host(pg)
    await host.setup()
    tel, p = await _configure(pg, tmp_path)
    tel.shutdown()
    ddl: list[str] = []
    from sqlalchemy import Engine

    seen = lambda conn, cursor, sql, *a: ddl.append(sql) if "CREATE" in sql else None  # noqa: E731
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        (tmp_path / "again").mkdir()
        tel, p = await _configure(pg, tmp_path / "again")
        assert p.writes_in_transaction
        tel.shutdown()
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert not [s for s in ddl if "FUNCTION" in s]
    async with host.engine.connect() as conn:
        names = (
            await conn.execute(
                text("SELECT proname FROM pg_proc WHERE proname LIKE 'chatter_otel_write_%'")
            )
        ).scalars()
        assert list(names) == [function_name(MessageMapping())]  # fmt: skip
    other = MessageMapping(conversation_total_cost="cost_total")
    assert function_name(other) != function_name(MessageMapping())
    await host.engine.dispose()


# -- SQLite: one insert into the ledger's view -------------------------------------------------


def _ours(statements: list[str]) -> list[str]:
    return [s for s in statements if "chatter_" in s or "SAVEPOINT" in s]


async def test_sqlite_a_refusal_inside_the_trigger_leaves_the_app_s_transaction_whole(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused at the trigger's last write (the call rows), after it claimed the run and added
    to the conversation: SQLite undoes the whole statement and only it."""
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    # batch_delay_s: the worker writes nothing until the flush, after the refusal is lifted
    async with _hosted(url, tmp_path, batch_delay_s=3600.0) as (host, p):
        assert p.writes_in_transaction
        async with host.engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON chatter_usage_ledger "
                "BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )

        async def lift() -> None:
            # the claim and the conversation's delta before the refused write were undone
            assert await host.rows(RUNS) == [] and await host.rows(LEDGER) == []
            async with host.engine.begin() as conn:
                totals = await conn.exec_driver_sql("SELECT total_tokens FROM conversations")
                assert totals.scalars().all() == [0]
                await conn.exec_driver_sql("DROP TRIGGER refuse")

        statements: list[str] = []
        await _chats_then_totals(host, p, statements, then=lift)
        insert = f'INSERT INTO "{view_name(MessageMapping())}" VALUES(?, ?, ?, ?, ?)'
        assert _ours(statements) == [insert, insert]  # and no savepoint
        assert ("cannot write the run's usage in the app's transaction (IntegrityError: "
                "(sqlite3.IntegrityError) refused for the test") in caplog.text  # fmt: skip
        assert "the ledger's worker writes it after the commit" in caplog.text


async def test_sqlite_a_view_missing_on_the_app_s_database_aborts_nothing(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The app's database has no view (dropped here; an app whose engine is another file
    than the ledger's URL is the same case): the insert fails before it runs."""
    caplog.set_level(logging.WARNING, "chatter_otel")
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    async with _hosted(url, tmp_path) as (host, p):
        assert p.writes_in_transaction
        async with host.engine.begin() as conn:
            await conn.exec_driver_sql(f'DROP VIEW "{view_name(MessageMapping())}"')
        statements: list[str] = []
        await _chats_then_totals(host, p, statements)
        assert not [s for s in statements if "SAVEPOINT" in s]
        assert f"no such table: {view_name(MessageMapping())}" in caplog.text


async def test_sqlite_the_view_is_made_once_per_definition(tmp_path: Any) -> None:
    """A second ledger on the same file keeps the one view and trigger; another mapping
    makes its own."""
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    async with _hosted(url, tmp_path) as (host, p):
        assert p.writes_in_transaction
    (tmp_path / "again").mkdir()
    async with _hosted(url, tmp_path / "again") as (host, p):
        assert p.writes_in_transaction
        async with host.engine.connect() as conn:
            found = await conn.exec_driver_sql(
                "SELECT type, name FROM sqlite_master WHERE name LIKE 'chatter_otel_write_%' "
                "ORDER BY type"
            )
            view = view_name(MessageMapping())
            assert found.all() == [("trigger", view + "_insert"), ("view", view)]
    assert view_name(MessageMapping(conversation_total_cost="cost_total")) != view


async def test_sqlite_without_json_functions_takes_the_savepoint(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An SQLite built without its JSON functions (made here by replacing ``json_extract``
    with one that fails, on every connection): no view, one line says why, and each chat's
    accounting is the fallback's savepoint and three statements, totals exact."""
    from sqlalchemy import Engine

    def no_json(dbapi_connection: Any, record: Any) -> None:
        def refuse(*args: Any) -> Any:
            raise ValueError("no JSON here")

        dbapi_connection.create_function("json_extract", -1, refuse)

    caplog.set_level(logging.WARNING, "chatter_otel")
    event.listen(Engine, "connect", no_json)
    try:
        url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
        async with _hosted(url, tmp_path) as (host, p):
            assert p.writes_in_transaction
            statements: list[str] = []
            seen = lambda conn, cursor, sql, *a: statements.append(sql)  # noqa: E731
            event.listen(host.engine.sync_engine, "before_cursor_execute", seen)
            cid = await host.new_conversation()
            mid = await host.chat(cid, "weather in Lima")
            event.remove(host.engine.sync_engine, "before_cursor_execute", seen)
            await _flush(p)
            assert p.stats["in_transaction"] == 1
            (msg,) = await host.messages(cid)
            assert msg.id == mid
            assert (await host.conversation(cid)).total_tokens == msg.total_tokens > 0
            async with host.engine.connect() as conn:
                found = await conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE name LIKE 'chatter_otel_write_%'"
                )
                assert found.all() == []
    finally:
        event.remove(Engine, "connect", no_json)
    ours = [s.split(" (")[0] for s in statements
            if "chatter_" in s or "SAVEPOINT" in s or 'UPDATE "conversations"' in s]  # fmt: skip
    assert ours == ["SAVEPOINT sa_savepoint_1", "INSERT INTO chatter_usage_runs",
                    "INSERT INTO chatter_usage_ledger",
                    'UPDATE "conversations" SET "total_tokens" = "total_tokens" + ?, '
                    '"total_cost" = "total_cost" + ? WHERE "id" = ?',
                    "RELEASE SAVEPOINT sa_savepoint_1"]  # fmt: skip
    assert ("cannot create the ledger's write view (no JSON functions in this SQLite) "
            "(OperationalError") in caplog.text  # fmt: skip


# -- an app that manages the schema: the statement from its migration ------------------------


@pytest.mark.parametrize("migrated", [True, False], ids=["migrated", "not-migrated"])
async def test_an_app_managed_schema_gets_the_one_statement_from_its_migration(
    database: str, tmp_path: Any, migrated: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``create_tables=False``: the app's migration makes our tables and, with
    ``write_statement_ddl``, the write statement: the ledger finds it and each chat is one
    statement of ours. Without it, one line says what to run, and the savepoint path writes
    the same numbers."""
    caplog.set_level(logging.WARNING, "chatter_otel")
    host = Host(database)
    await host.setup()
    dialect = host.engine.dialect.name
    async with host.engine.begin() as conn:  # the app's migration
        await conn.run_sync(metadata.create_all)
        for ddl in write_statement_ddl(dialect) if migrated else ():
            await conn.exec_driver_sql(ddl)
    await host.engine.dispose()
    async with _hosted(database, tmp_path, create_tables=False) as (host, p):
        assert p.writes_in_transaction
        statements: list[str] = []
        seen = lambda conn, cursor, sql, *a: statements.append(sql)  # noqa: E731
        event.listen(host.engine.sync_engine, "before_cursor_execute", seen)
        cid = await host.new_conversation()
        for i in range(2):
            await host.chat(cid, f"weather in Lima {i}")
        event.remove(host.engine.sync_engine, "before_cursor_execute", seen)
        await _flush(p)
        assert p.stats["in_transaction"] == 2
        msgs = await host.messages(cid)
        ledger = await host.rows(LEDGER)
        conv = await host.conversation(cid)
        assert conv.total_tokens == sum(m.total_tokens for m in msgs) == sum(
            r.total_tokens for r in ledger) > 0  # fmt: skip
    ours = [s.split("(")[0].split(" VALUES")[0] for s in _ours(statements)]
    hint = f"until your migration runs chatter_otel.persistence.write_statement_ddl('{dialect}')"
    if not migrated:
        assert hint in caplog.text
        assert ours == ["SAVEPOINT sa_savepoint_1", "INSERT INTO chatter_usage_runs ",
                        "INSERT INTO chatter_usage_ledger ",
                        "RELEASE SAVEPOINT sa_savepoint_1"] * 2  # fmt: skip
        return
    assert "write_statement_ddl" not in caplog.text
    if dialect == "sqlite":
        assert ours == [f'INSERT INTO "{view_name(MessageMapping())}"'] * 2
    else:  # the first call on the connection in a savepoint
        call = f'SELECT "public".{function_name(MessageMapping())}'
        assert ours == ["SAVEPOINT sa_savepoint_1", call, "RELEASE SAVEPOINT sa_savepoint_1",
                        call]  # fmt: skip


async def test_a_quote_in_a_mapped_name_is_part_of_the_name(database: str) -> None:
    """The app's table and column names are quoted with any ``"`` in them doubled: the
    conversation's update adds to the named columns exactly, and the write statement's DDL
    for such a mapping runs, on both databases."""
    from decimal import Decimal

    from sqlalchemy import Column, MetaData, Numeric, String, Table

    from chatter_otel.persistence.schema import add_statement

    mapping = MessageMapping(conversations_table='chat "rooms"', conversation_pk='room "id"',
                             conversation_total_tokens='tokens" so far',
                             conversation_total_cost='"cost"')  # fmt: skip
    rooms = Table('chat "rooms"', MetaData(), Column('room "id"', String(36), primary_key=True),
                  Column('tokens" so far', Numeric(20, 0)),
                  Column('"cost"', Numeric(20, 10)))  # fmt: skip
    engine = create_async_engine(database)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.run_sync(rooms.create)
            await conn.execute(rooms.insert().values({'room "id"': "r1", 'tokens" so far': 5,
                                                      '"cost"': Decimal("0.5")}))  # fmt: skip
            for ddl in write_statement_ddl(engine.dialect.name, mapping):
                await conn.exec_driver_sql(ddl)
        async with engine.begin() as conn:
            add = add_statement(mapping)
            for tokens in (7, 30):
                await conn.execute(add, {"tokens": tokens, "cost": Decimal("0.25"), "conv": "r1"})
            row = (await conn.execute(rooms.select())).one()
        assert tuple(row) == ("r1", 42, Decimal("1.0"))
    finally:
        await engine.dispose()


def test_write_statement_ddl_is_for_the_ledger_s_databases() -> None:
    with pytest.raises(ValueError, match="PostgreSQL or SQLite, not 'mysql'"):
        write_statement_ddl("mysql")
