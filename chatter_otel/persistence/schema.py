"""Our tables, the mapping onto the app's, and the rows and statements the ledger writes."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    case,
    func,
    or_,
    text,
)

if TYPE_CHECKING:
    from chatter_otel.instrumentation.records import LLMCallRecord, WorkflowRecord

_log = logging.getLogger("chatter_otel")

metadata = MetaData()
LEDGER = Table(
    "chatter_usage_ledger", metadata,
    Column("span_id", String(16), primary_key=True),
    Column("trace_id", String(32), nullable=False),
    Column("workflow_id", String(16), index=True),
    Column("conversation_id", String(256), index=True),
    Column("message_id", String(256)),
    Column("correlation_id", String(128)),
    Column("user_id", String(256)),
    Column("provider", String(64)),
    Column("model", String(256)),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("total_tokens", BigInteger),
    Column("cache_read_tokens", BigInteger),
    Column("cache_creation_tokens", BigInteger),
    Column("reasoning_tokens", BigInteger),
    Column("cost", Numeric(20, 10)),
    Column("currency", String(8)),
    Column("cost_source", String(16)),
    Column("price_table", String(96)),  # added after 0.1.0: UsagePersistence adds it if absent
    Column("usage_estimated", Boolean),  # added after 0.1.0, as price_table; NULL on old rows
    Column("finish_reason", String(64)),
    Column("started_at", Float),
    Column("duration_ms", Float),
    Column("status", String(16)),
)  # fmt: skip
RUNS = Table(
    "chatter_usage_runs", metadata,
    Column("workflow_id", String(16), primary_key=True),
    Column("trace_id", String(32)),
    Column("conversation_id", String(256), index=True),
    Column("message_id", String(256)),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("total_tokens", BigInteger),
    Column("cost", Numeric(20, 10)),
    Column("status", String(16)),
    Column("response_time_ms", BigInteger),
    Column("finished_at", Float),
    Column("applied_at", Float),
    # The sweep's look for runs no message took reads only these, not a table that grows
    # with every run (partial: PostgreSQL and SQLite both have them).
    Index("ix_chatter_usage_runs_unapplied", "finished_at",
          postgresql_where=text("applied_at IS NULL"), sqlite_where=text("applied_at IS NULL")),
)  # fmt: skip


@dataclass(frozen=True)
class MessageMapping:
    """Where usage goes in the app's tables; the defaults are the chatter column names."""

    messages_table: str = "messages"
    conversations_table: str = "conversations"
    message_id: str = "id"
    conversation_id: str = "conversation_id"
    role: str = "role"
    assistant_roles: tuple[str, ...] = ("ASSISTANT", "assistant")
    prompt_tokens: str = "prompt_tokens"
    completion_tokens: str = "completion_tokens"
    total_tokens: str = "total_tokens"
    cost: str = "cost"
    provider: str = "provider_used"
    model: str = "model_used"
    finish_reason: str = "finish_reason"
    response_time_ms: str = "response_time_ms"
    conversation_pk: str = "id"
    conversation_total_tokens: str = "total_tokens"
    conversation_total_cost: str = "total_cost"


def role_name(value: Any) -> str:
    return str(getattr(value, "name", value))


def is_empty(value: Any) -> bool:
    return value is None or value == 0


def if_empty(col: Any, value: Any) -> Any:
    """``value`` where the column is NULL, zero or empty (the app's placeholders), else as is."""
    placeholder = "" if isinstance(value, str) else 0
    return case((or_(col.is_(None), col == placeholder), value), else_=col)


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # sqlite: the only other backend UsagePersistence accepts
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert


# The statements below are built once per dialect (or mapping) and reused: building one
# (``excluded`` aliases every column) cost more than executing it from SQLAlchemy's cache.
# Bounded caches: their keys are few (two dialects, our tables, the app's mappings).
@functools.lru_cache(maxsize=32)
def _insert_ignore(dialect: str, table: Table, key: str) -> Any:
    return _insert(dialect)(table).on_conflict_do_nothing(index_elements=[key])


def insert_ignore(conn: Any, table: Table, key: str) -> Any:
    """An insert that skips rows already there (a replay): ``ON CONFLICT DO NOTHING``."""
    return _insert_ignore(conn.dialect.name, table, key)


@functools.lru_cache(maxsize=32)
def _ledger_upsert(dialect: str) -> Any:
    stmt = _insert(dialect)(LEDGER)
    return stmt.on_conflict_do_update(
        index_elements=[LEDGER.c.span_id],
        set_={"message_id": func.coalesce(LEDGER.c.message_id, stmt.excluded.message_id)},
    )


def ledger_upsert(conn: Any) -> Any:
    """Insert a run's call rows with the message they answer, or give rows the worker wrote
    first that message (where they have none): one statement for both."""
    return _ledger_upsert(conn.dialect.name)


@functools.lru_cache(maxsize=32)
def _claim_upsert(dialect: str) -> Any:
    stmt = _insert(dialect)(RUNS)
    return stmt.on_conflict_do_update(
        index_elements=[RUNS.c.workflow_id],
        set_={"applied_at": stmt.excluded.applied_at, "message_id": stmt.excluded.message_id},
        where=RUNS.c.applied_at.is_(None),
    )


def claim_upsert(conn: Any) -> Any:
    """Insert the run row claimed, or claim the row the worker inserted first; rowcount 1 only
    for whoever claims it (``applied_at IS NULL`` -> now), so a run is added once."""
    return _claim_upsert(conn.dialect.name)


@functools.lru_cache(maxsize=8)
def _lengths(table: Table) -> tuple[tuple[str, int | None], ...]:
    return tuple((col.name, getattr(col.type, "length", None)) for col in table.c)


def fit(table: Table, record: dict[str, Any]) -> dict[str, Any]:
    """Every column of ``table`` (one executemany needs the same keys), strings cut to the
    column's length: an over-long id from a hostile header must not make PostgreSQL refuse it."""
    out: dict[str, Any] = {}
    for name, length in _lengths(table):
        value = record.get(name)
        if length and isinstance(value, str) and len(value) > length:
            value = value[:length]
        out[name] = value
    return out


def ledger_row(rec: LLMCallRecord) -> dict[str, Any]:
    ids = rec.ids
    return {
        "span_id": rec.span_id, "trace_id": rec.trace_id, "workflow_id": rec.workflow_id,
        "conversation_id": ids.conversation_id, "message_id": ids.message_id,
        "correlation_id": ids.correlation_id, "user_id": ids.user_id,
        "provider": rec.provider, "model": rec.model,
        "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
        "total_tokens": rec.total_tokens, "cache_read_tokens": rec.cache_read_tokens,
        "cache_creation_tokens": rec.cache_creation_tokens,
        "reasoning_tokens": rec.reasoning_tokens, "cost": rec.cost,
        "currency": rec.cost_currency, "cost_source": rec.cost_source,
        "price_table": rec.cost_table,
        "usage_estimated": rec.usage_estimated,
        "finish_reason": rec.finish_reasons[0] if rec.finish_reasons else None,
        "started_at": rec.start_ns / 1e9, "duration_ms": (rec.end_ns - rec.start_ns) / 1e6,
        "status": "error" if rec.failed else "ok",
    }  # fmt: skip


def run_row(rec: WorkflowRecord, applied_at: float | None = None) -> dict[str, Any]:
    return {
        "workflow_id": rec.span_id, "trace_id": rec.trace_id,
        "conversation_id": rec.ids.conversation_id, "message_id": rec.ids.message_id,
        "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
        "total_tokens": rec.total_tokens, "cost": rec.cost,
        "status": "error" if rec.failed else "ok",
        "response_time_ms": (rec.end_ns - rec.start_ns) // 1_000_000,
        "finished_at": rec.end_ns / 1e9, "applied_at": applied_at,
    }  # fmt: skip


def quoted(name: str) -> str:
    """An identifier of the app's mapping quoted for SQL text (both dialects): a ``"`` in a
    name is doubled, so any name the app's schema has is that name and nothing more."""
    return '"' + name.replace('"', '""') + '"'


@functools.lru_cache(maxsize=32)
def add_statement(m: MessageMapping) -> Any:
    """``UPDATE conversations SET total = total + :delta``: exact under concurrency."""
    tokens, cost = quoted(m.conversation_total_tokens), quoted(m.conversation_total_cost)
    return text(
        f"UPDATE {quoted(m.conversations_table)} SET {tokens} = {tokens} + :tokens, "
        f"{cost} = {cost} + :cost WHERE {quoted(m.conversation_pk)} = :conv"
    ).bindparams(
        # typed: each dialect converts the Decimal its own way (sqlite3 cannot bind it)
        bindparam("tokens", type_=BigInteger()),
        bindparam("cost", type_=Numeric(20, 10)),
        bindparam("conv", type_=String()),
    )
