"""PostgreSQL: one function call writes a run's accounting in the app's transaction.

The run's claim, its call rows and its conversation's totals are written on the app's
connection, inside the app's transaction, and a refusal of ours (a lock timeout, a constraint
the app added, a deadlock) must never abort that transaction. A ``SAVEPOINT`` gives that at the
price of two more round trips per chat. A PL/pgSQL block with an ``EXCEPTION`` clause gives the
same on the server (the block is a subtransaction: a refusal undoes only its own writes) inside
ONE statement: ``SELECT "schema".chatter_otel_write_<hash>(...)``.

Every argument is text and is parsed inside the block, so no value of ours can fail before the
block starts (a value PostgreSQL refuses is a refusal like any other: the function returns it).
What would still abort the app's transaction is the call itself failing: the function missing
on that connection's database. So a connection calls it bare only after one call inside a
savepoint has worked on it (``proven``); its first call, on each pooled connection, is guarded.

The function is created by the ledger's worker next to our tables (only where it creates them:
``create_tables=True``); its name carries a hash of its body, so a release that changes it, or
another mapping onto the app's tables, makes a function of its own. ``SET search_path FROM
CURRENT`` pins the tables it names to those the worker found, whatever the app's connection
sets.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, text

from chatter_otel.persistence.schema import LEDGER, RUNS, MessageMapping

_log = logging.getLogger("chatter_otel")

_ARGS = "(text, text, text, text, text)"
_TAG = "$chatter_otel$"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def function_body(m: MessageMapping) -> str:
    """$1 the run's row, $2 its call rows (JSON), $3 the conversation, $4 tokens, $5 cost.
    Runs before calls: the ledger's worker takes them in that order too (no deadlock)."""
    conv, pk = _ident(m.conversations_table), _ident(m.conversation_pk)
    tokens, cost = _ident(m.conversation_total_tokens), _ident(m.conversation_total_cost)
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
    digest = hashlib.sha256(function_body(m).encode()).hexdigest()[:16]
    return f"chatter_otel_write_{digest}"


def ensure_function(conn: Any, m: MessageMapping) -> str | None:
    """Create the function where it is not (the worker's connection, in its transaction);
    its qualified name, or None where it cannot be had (then the savepoint path is used)."""
    body = function_body(m)
    if _TAG in body:  # a mapping name that would end the function's quoting
        return None
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    if schema is None:
        return None
    qualified = f"{_ident(schema)}.{function_name(m)}"
    exists = text("SELECT to_regprocedure(:sig) IS NOT NULL")
    if conn.execute(exists, {"sig": qualified + _ARGS}).scalar():
        return qualified
    ddl = (f"CREATE OR REPLACE FUNCTION {qualified}{_ARGS} RETURNS text LANGUAGE plpgsql "
           f"SET search_path FROM CURRENT AS {_TAG}{body}{_TAG}")  # fmt: skip
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(ddl)
    except Exception as exc:  # another process made it at the same moment, or no privilege
        if conn.execute(exists, {"sig": qualified + _ARGS}).scalar():
            return qualified
        _log.warning("chatter-otel: cannot create the ledger's write function (%s: %.300s); "
                     "each chat's accounting takes a savepoint and three statements instead "
                     "of one", type(exc).__name__, exc)  # fmt: skip
        return None
    return qualified


def _json(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@functools.lru_cache(maxsize=8)  # a name per mapping and release: few
def call(qualified: str) -> Any:
    """The statement; ``call_params`` its parameters."""
    return text(f"SELECT {qualified}(:run, :calls, :conv, :tokens, :cost)").bindparams(
        *(bindparam(name, type_=None) for name in ("run", "calls", "conv", "tokens", "cost"))
    )


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
