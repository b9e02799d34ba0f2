"""One statement writes a run's accounting in the app's transaction (PostgreSQL and SQLite).

The run's claim, its call rows and its conversation's totals are written on the app's
connection, inside the app's transaction, and a refusal of ours (a lock timeout, a constraint
or trigger the app added, a deadlock) must never abort that transaction. A client-side
``SAVEPOINT`` gives that at the price of two more statements per chat; each database has a way
to get the same inside ONE statement, created by the ledger's worker next to our tables (only
where it creates them: ``create_tables=True``):

- **PostgreSQL**: a PL/pgSQL function, ``SELECT "schema".chatter_otel_write_<hash>(...)``. Its
  block has an ``EXCEPTION`` clause, so it is a subtransaction on the server: a refusal undoes
  only its own writes and is returned (SQLSTATE and message). Every argument is text, parsed
  inside the block, so no value of ours can fail before the block starts. What would still
  abort the app's transaction is the call itself failing (the function missing on that
  connection's database), so a connection calls it bare only after one call inside a savepoint
  has worked on it (``proven``). ``SET search_path FROM CURRENT`` pins the tables it names.
- **SQLite**: ``INSERT INTO chatter_otel_write_<hash> VALUES (...)``, a view with an ``INSTEAD
  OF INSERT`` trigger that does the three writes. SQLite undoes a failed statement alone (its
  statement journal; the trigger's writes are part of the statement) and the transaction goes
  on; a view missing on the app's database fails while the statement is prepared, before
  anything runs. So no savepoint is ever needed. The arguments are the same text as
  PostgreSQL's, read with SQLite's JSON functions (built in since 3.38; without them, the
  savepoint path is used).

The name carries a hash of the definition, so a release that changes it, or another mapping
onto the app's tables, makes one of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Table, bindparam, text

from chatter_otel.persistence.schema import LEDGER, RUNS, MessageMapping, quoted

_log = logging.getLogger("chatter_otel")

_ARGS = "(text, text, text, text, text)"
_TAG = "$chatter_otel$"
_PARAMS = ("run", "calls", "conv", "tokens", "cost")


@dataclass(frozen=True)
class WriteStatement:
    """What the app's transaction runs for a run: ``statement`` with ``call_params``."""

    dialect: str
    name: str
    statement: Any

    @property
    def returns_refusal(self) -> bool:
        """PostgreSQL's function returns what it refused; SQLite's statement raises it."""
        return self.dialect == "postgresql"


def _digest(definition: str) -> str:
    return "chatter_otel_write_" + hashlib.sha256(definition.encode()).hexdigest()[:16]


def function_body(m: MessageMapping) -> str:
    """$1 the run's row, $2 its call rows (JSON), $3 the conversation, $4 tokens, $5 cost.
    Runs before calls: the ledger's worker takes them in that order too (no deadlock)."""
    conv, pk = quoted(m.conversations_table), quoted(m.conversation_pk)
    tokens, cost = quoted(m.conversation_total_tokens), quoted(m.conversation_total_cost)
    runs, ledger = RUNS.name, LEDGER.name
    return f"""
DECLARE
  claimed integer;
BEGIN
  INSERT INTO {runs} AS r
    SELECT * FROM jsonb_populate_record(NULL::{runs}, $1::jsonb)
    ON CONFLICT (workflow_id) DO UPDATE
      SET applied_at = excluded.applied_at, message_id = excluded.message_id
      WHERE r.applied_at IS NULL;
  GET DIAGNOSTICS claimed = ROW_COUNT;
  INSERT INTO {ledger} AS l
    SELECT * FROM jsonb_populate_recordset(NULL::{ledger}, $2::jsonb)
    ON CONFLICT (span_id) DO UPDATE SET message_id = coalesce(l.message_id, excluded.message_id);
  IF claimed = 1 AND $3 IS NOT NULL AND ($4::bigint <> 0 OR $5::numeric <> 0) THEN
    UPDATE {conv} SET {tokens} = {tokens} + $4::bigint, {cost} = {cost} + $5::numeric
      WHERE {pk} = $3;
  END IF;
  RETURN NULL;
EXCEPTION WHEN OTHERS OR query_canceled THEN
  RETURN SQLSTATE || ' ' || SQLERRM;
END
"""


def function_name(m: MessageMapping) -> str:
    """PostgreSQL's function."""
    return _digest(function_body(m))


def _json_columns(table: Table, source: str) -> str:
    return ", ".join(f"json_extract({source}, '$.{c.name}')" for c in table.c)


def trigger_body(m: MessageMapping, view: str) -> str:
    """SQLite's trigger on ``view``: the claim, the conversation when the claim was ours
    (``changes()`` is the claim's count here: SQLite sets it per statement of a trigger), the
    call rows. SQLite locks the whole database for a write, so their order cannot deadlock."""
    conv, pk = quoted(m.conversations_table), quoted(m.conversation_pk)
    tokens, cost = quoted(m.conversation_total_tokens), quoted(m.conversation_total_cost)
    runs, ledger = RUNS.name, LEDGER.name
    # "WHERE true": SQLite's parser needs it between an INSERT's SELECT and its ON CONFLICT
    return f"""INSTEAD OF INSERT ON {quoted(view)} BEGIN
  INSERT INTO {runs} ({", ".join(c.name for c in RUNS.c)})
    SELECT {_json_columns(RUNS, "NEW.run")} WHERE true
    ON CONFLICT (workflow_id) DO UPDATE
      SET applied_at = excluded.applied_at, message_id = excluded.message_id
      WHERE applied_at IS NULL;
  UPDATE {conv} SET {tokens} = {tokens} + CAST(NEW.tokens AS INTEGER),
      {cost} = {cost} + CAST(NEW.cost AS NUMERIC)
    WHERE changes() = 1 AND {pk} = NEW.conv
      AND (CAST(NEW.tokens AS INTEGER) <> 0 OR CAST(NEW.cost AS NUMERIC) <> 0);
  INSERT INTO {ledger} ({", ".join(c.name for c in LEDGER.c)})
    SELECT {_json_columns(LEDGER, "value")} FROM json_each(NEW.calls) WHERE true
    ON CONFLICT (span_id) DO UPDATE SET message_id = coalesce(message_id, excluded.message_id);
END"""


def view_name(m: MessageMapping) -> str:
    """SQLite's view (its trigger is named after it)."""
    return _digest(trigger_body(m, "chatter_otel_write"))


def write_statement_ddl(dialect: str, mapping: MessageMapping | None = None) -> list[str]:
    """The statements that create the ledger's one-statement write, for an app that manages
    its schema itself (``UsagePersistence(create_tables=False)``): put them in the migration
    that creates our tables. ``dialect`` is ``"postgresql"`` (the function, in the schema
    first on the migration's ``search_path``) or ``"sqlite"`` (the view and its trigger). The
    names carry a hash of the definition: a release that changes it says so in one log line
    (and uses the savepoint path) until the migration has made the new one."""
    m = mapping or MessageMapping()
    if dialect == "postgresql":
        return [_function_ddl(function_name(m), function_body(m))]
    if dialect == "sqlite":
        return _view_ddl(view_name(m), m)
    raise ValueError(f"the ledger writes to PostgreSQL or SQLite, not {dialect!r}")


def _function_ddl(name: str, body: str) -> str:
    return (f"CREATE OR REPLACE FUNCTION {name}{_ARGS} RETURNS text LANGUAGE plpgsql "
            f"SET search_path FROM CURRENT AS {_TAG}{body}{_TAG}")  # fmt: skip


def _view_ddl(view: str, m: MessageMapping) -> list[str]:
    # IF NOT EXISTS: another process may make them at the same moment (SQLite's DDL is
    # transactional: both are there, or neither).
    trigger = quoted(view + "_insert")
    return [f"CREATE VIEW IF NOT EXISTS {quoted(view)} ({', '.join(_PARAMS)}) AS "
            "SELECT NULL, NULL, NULL, NULL, NULL WHERE 0",
            f"CREATE TRIGGER IF NOT EXISTS {trigger} {trigger_body(m, view)}"]  # fmt: skip


def ensure(conn: Any, m: MessageMapping, *, create: bool = True) -> WriteStatement | None:
    """The write statement, created where it is not when ``create`` (the worker's connection,
    in its transaction); else only found. None where it cannot be had: then the savepoint
    path is used."""
    if conn.dialect.name == "postgresql":
        return _function(conn, m, create)
    if conn.dialect.name == "sqlite":
        return _view(conn, m, create)
    return None


def _function(conn: Any, m: MessageMapping, create: bool) -> WriteStatement | None:
    body = function_body(m)
    if _TAG in body:  # a mapping name that would end the function's quoting
        return None
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    if schema is None:
        return None
    qualified = f"{quoted(schema)}.{function_name(m)}"
    found = WriteStatement("postgresql", qualified, _statement(f"SELECT {qualified}"))

    def exists() -> bool:
        sig = {"sig": qualified + _ARGS}
        return bool(conn.execute(text("SELECT to_regprocedure(:sig) IS NOT NULL"), sig).scalar())

    if exists():
        return found
    if not create:
        _not_made("function", "postgresql")
        return None
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(_function_ddl(qualified, body))
    except Exception as exc:  # another process made it at the same moment, or no privilege
        if exists():
            return found
        _cannot("function", exc)
        return None
    return found


def _view(conn: Any, m: MessageMapping, create: bool) -> WriteStatement | None:
    view = view_name(m)
    found = WriteStatement("sqlite", view, _statement(f"INSERT INTO {quoted(view)} VALUES"))
    try:
        conn.exec_driver_sql("SELECT json_extract('[1]', '$[0]')")
    except Exception as exc:  # an SQLite built without its JSON functions
        _cannot("view (no JSON functions in this SQLite)", exc)
        return None
    if not create:
        names = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE name IN (?, ?)", (view, view + "_insert")
        ).scalars()
        if len(set(names)) == 2:
            return found
        _not_made("view", "sqlite")
        return None
    try:  # a failed DDL statement leaves the worker's transaction as it was (SQLite's)
        for ddl in _view_ddl(view, m):
            conn.exec_driver_sql(ddl)
    except Exception as exc:
        _cannot("view", exc)
        return None
    return found


def _cannot(what: str, exc: Exception) -> None:
    _log.warning("chatter-otel: cannot create the ledger's write %s (%s: %.300s); each chat's "
                 "accounting takes a savepoint and three statements instead of one", what,
                 type(exc).__name__, exc)  # fmt: skip


def _not_made(what: str, dialect: str) -> None:
    _log.warning("chatter-otel: the ledger's write %s is not in the database (create_tables="
                 "False: the app manages the schema); each chat's accounting takes a savepoint "
                 "and three statements instead of one until your migration runs "
                 "chatter_otel.persistence.write_statement_ddl(%r)", what, dialect)  # fmt: skip


def _statement(head: str) -> Any:
    return text(f"{head}(:run, :calls, :conv, :tokens, :cost)").bindparams(
        *(bindparam(name, type_=None) for name in _PARAMS)
    )


def _json(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def call_params(run: dict[str, Any], calls: list[dict[str, Any]], *, conv: str | None,
                tokens: int, cost: Decimal) -> dict[str, Any]:  # fmt: skip
    """Raises (ValueError on NaN, TypeError) before anything is sent: the app's transaction
    is never touched by a value that cannot be written."""
    total = Decimal(str(cost))
    if not total.is_finite():
        raise ValueError(f"the run's cost is {cost}")
    return {
        "run": json.dumps(run, default=_json, allow_nan=False),
        "calls": json.dumps(calls, default=_json, allow_nan=False),
        "conv": conv,
        "tokens": str(int(tokens)),
        "cost": str(total),
    }
