"""The database side of the ledger: tables, schema checks, batches, claims, conversation deltas."""

from __future__ import annotations

import logging
import sqlite3
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    and_,
    column,
    func,
    inspect,
    select,
    table,
    update,
)

from chatter_otel._safety import warn_once
from chatter_otel.persistence.one_statement import WriteStatement, ensure
from chatter_otel.persistence.schema import (
    LEDGER,
    RUNS,
    MessageMapping,
    add_statement,
    fit,
    if_empty,
    insert_ignore,
    metadata,
)
from chatter_otel.persistence.spool import SpoolUnusable

if TYPE_CHECKING:
    from pathlib import Path

    from chatter_otel.persistence.committed import CommittedRows
    from chatter_otel.persistence.spool import Spool, SpoolRow

_log = logging.getLogger("chatter_otel")

_SCHEMA_RECHECK_S = 1.0


class _Deltas(dict[str, list[Any]]):
    """Conversation id -> [tokens, cost] to add, in one transaction; ``claimed`` runs in it."""

    claimed = 0


class LedgerWriter:
    """Mixed into ``UsagePersistence``: what its worker does with the database."""

    mapping: MessageMapping
    stats: dict[str, int]
    batch_size: int
    grace_s: float
    create_tables: bool
    spool_path: Path
    _url: Any
    _ready: bool
    _message_columns: frozenset[str]
    _conversations_ok: bool
    _schema_checked: float
    _ledger_skip: frozenset[str] = frozenset()  # columns an app-managed table lacks
    _committed: CommittedRows
    _write: WriteStatement | None
    # Wall time the earliest run this worker wrote unclaimed falls due (finished + grace_s):
    # the sweep runs then, not once a second (see DatabaseLoop._next_sweep).
    _sweep_due: float = float("inf")

    def _ledger_fit(self, row: dict[str, Any]) -> dict[str, Any]:
        fitted = fit(LEDGER, row)
        for name in self._ledger_skip:
            fitted.pop(name, None)
        return fitted

    async def _ensure_tables(self, engine: Any) -> None:
        if not self._ready:
            async with engine.begin() as conn:
                if self.create_tables:
                    await conn.run_sync(metadata.create_all)
                await conn.run_sync(self._add_new_columns)
                # next to our tables, made where we make them, else found if the app's
                # migration made it; not where the app's ledger table lacks columns
                if not self._ledger_skip:
                    self._write = await conn.run_sync(ensure, self.mapping,
                                                      create=self.create_tables)  # fmt: skip
            self._ready = True
        if not self._conversations_ok:  # known before the app's first message, when it can be
            async with engine.connect() as conn:
                await self._know_app_schema(conn)

    def _add_new_columns(self, conn: Any) -> None:
        """A ledger table made by an older release lacks the columns added since: added here
        (nullable: old rows keep NULL), or, where the app manages the schema
        (``create_tables=False``), left out of our writes with one line naming the statement."""
        insp = inspect(conn)
        if insp.has_table(RUNS.name) and self.create_tables:
            have_ix = {ix["name"] for ix in insp.get_indexes(RUNS.name)}
            for ix in sorted(RUNS.indexes, key=lambda i: str(i.name)):
                if ix.name not in have_ix:  # an index added since the table was made
                    self._add_index(conn, ix)
        if not insp.has_table(LEDGER.name):
            return
        have = {c["name"] for c in insp.get_columns(LEDGER.name)}
        missing = [c for c in LEDGER.columns if c.name not in have]
        for col in missing:
            ddl = (f"ALTER TABLE {LEDGER.name} ADD COLUMN {col.name} "
                   f"{col.type.compile(dialect=conn.dialect)}")  # fmt: skip
            if self.create_tables:
                conn.exec_driver_sql(ddl)
                _log.info("chatter-otel: usage ledger table upgraded: %s", ddl)
            else:
                warn_once(f"ledger:column:{col.name}", "chatter-otel: the usage ledger table "
                          "has no column %s; it is left out of the rows until you run: %s",
                          col.name, ddl)  # fmt: skip
        if not self.create_tables:
            self._ledger_skip = frozenset(c.name for c in missing)

    @staticmethod
    def _add_index(conn: Any, ix: Any) -> None:
        """An index is only speed: one that cannot be made (a table another role owns) is
        said once, and the ledger goes on without it."""
        # a failed statement aborts a PostgreSQL transaction (not SQLite's): a savepoint there
        nested = conn.begin_nested() if conn.dialect.name == "postgresql" else None
        try:
            ix.create(conn)
            if nested is not None:
                nested.commit()
            _log.info("chatter-otel: usage runs table upgraded: index %s", ix.name)
        except Exception as exc:
            if nested is not None:
                nested.rollback()
            warn_once(f"ledger:index:{ix.name}", "chatter-otel: cannot add index %s to %s "
                      "(%s: %.300s); the ledger works without it, its sweep for runs no "
                      "message took reads more of the table", ix.name, RUNS.name,
                      type(exc).__name__, exc)  # fmt: skip

    async def _know_app_schema(self, conn: Any, *, now: bool = False) -> None:
        """Look at the app's tables; again (at most once a second, or ``now``) while one is
        missing, since the app may create them after the ledger started."""
        if self._message_columns and self._conversations_ok:
            return
        if not now and time.monotonic() - self._schema_checked < _SCHEMA_RECHECK_S:
            return
        self._schema_checked = time.monotonic()
        self._message_columns, self._conversations_ok = await conn.run_sync(self._app_schema)

    def _app_schema(self, conn: Any) -> tuple[frozenset[str], bool]:
        """The columns the app's messages table really has (follow-up updates touch no other),
        and whether its conversations table has the mapped columns."""
        m, insp = self.mapping, inspect(conn)
        messages: frozenset[str] = frozenset()
        if insp.has_table(m.messages_table):
            messages = frozenset(c["name"] for c in insp.get_columns(m.messages_table))
        conversations: frozenset[str] = frozenset()
        if insp.has_table(m.conversations_table):
            conversations = frozenset(c["name"] for c in insp.get_columns(m.conversations_table))
        return messages, self._conversation_columns() <= conversations

    def _conversation_columns(self) -> set[str]:
        m = self.mapping
        return {m.conversation_pk, m.conversation_total_tokens, m.conversation_total_cost}

    async def _drain(self, engine: Any, spool: Spool) -> int:
        """Write the spool to the database in batches, oldest first; returns rows written.
        Raises ``SpoolUnusable`` when the spool cannot be read (the database is not at fault)."""
        written = 0
        while True:
            try:
                rows = spool.peek(self.batch_size)
            except (sqlite3.Error, OSError) as exc:
                raise SpoolUnusable(str(exc)) from exc
            if spool.bad:
                self.stats["quarantined"] += spool.bad
                spool.bad = 0
            if not rows:
                self.stats["spooled"] = spool.count
                if not spool.count and written:
                    spool.checkpoint()
                return written
            todo = self._committed.unwritten(rows)  # the app's transactions wrote the rest
            try:
                if todo:
                    async with engine.begin() as conn:
                        await self._apply_rows(conn, todo)
            except Exception:
                # One record may be what the database refuses: find it, keep the rest flowing.
                written += await self._isolate(engine, spool, todo)
                if len(todo) < len(rows):  # the rest the app's transactions wrote
                    spool.delete(rows[-1][0])
                    written += self._count_written(spool, len(rows) - len(todo))
                continue
            spool.delete(rows[-1][0])
            written += self._count_written(spool, len(rows))

    def _count_written(self, spool: Spool, n: int) -> int:
        self.stats["written"] += n
        self.stats["spooled"] = spool.count
        return n

    async def _isolate(self, engine: Any, spool: Spool, rows: list[SpoolRow]) -> int:
        """Retry a refused batch one record at a time. A record the database refuses while it
        answers is quarantined (kept in the spool file, logged); an outage raises."""
        written = 0
        for row in rows:
            refused = await self._apply_alone(engine, row)
            if refused is None:
                spool.delete(row[0])
                written += self._count_written(spool, 1)
                continue
            try:
                spool.quarantine(row[0], f"{type(refused).__name__}: {refused}")
            except (sqlite3.Error, OSError) as exc:
                raise SpoolUnusable(str(exc)) from exc
            self.stats["quarantined"] += 1
            _log.error("chatter-otel: the usage database refused a %s record (%s: %.300s); "
                       "kept aside in table 'quarantine' of %s", row[1], type(refused).__name__,
                       refused, self.spool_path)  # fmt: skip
        return written

    async def _apply_alone(self, engine: Any, row: SpoolRow) -> Exception | None:
        """One record in its own transaction, tried twice (a deadlock or a serialization
        failure passes). Returns what the database said if it refused the record; raises if
        the database does not answer ``SELECT 1`` (an outage, not a bad record)."""
        refused: Exception | None = None
        for _attempt in range(2):
            try:
                async with engine.begin() as conn:
                    await self._apply_rows(conn, [row])
                return None
            except Exception as exc:
                refused = exc
            async with engine.connect() as conn:
                await conn.execute(select(1))
        return refused

    async def _apply_rows(self, conn: Any, rows: list[SpoolRow]) -> None:
        """All run rows in one executemany, all ledger rows in another, then the claims (the
        order in which they were made) and their conversation totals, in one transaction.

        Run rows first, as the app's transaction takes them (its one statement claims the run,
        then writes its call rows): a worker that took the call rows first and then waited
        for the run row deadlocked with an app writing the same run (PostgreSQL ends one of
        the two after ``deadlock_timeout``, a second the app's request waited)."""
        llm = [self._ledger_fit(r) for _, kind, r in rows if kind == "llm"]
        runs = [fit(RUNS, r) for _, kind, r in rows if kind == "run"]
        binds = [r for _, kind, r in rows if kind == "bind"]
        if runs:
            await conn.execute(insert_ignore(conn, RUNS, "workflow_id"), runs)
            finished = min((r["finished_at"] for r in runs if r["finished_at"] is not None),
                           default=time.time())  # fmt: skip
            self._sweep_due = min(self._sweep_due, finished + self.grace_s)
        if llm:
            await conn.execute(insert_ignore(conn, LEDGER, "span_id"), llm)
        if binds:
            await self._claim_all(conn, [(b["workflow_id"], b) for b in binds])

    async def _claim_all(self, conn: Any, claims: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Claim runs (one ``SELECT`` for all, an ``UPDATE`` each), then add to conversations."""
        ids = list({workflow_id for workflow_id, _ in claims})
        found = await conn.execute(select(RUNS).where(RUNS.c.workflow_id.in_(ids)))
        pending = {r.workflow_id: r for r in found if r.applied_at is None}
        deltas = _Deltas()
        for workflow_id, bind in claims:
            row = pending.pop(workflow_id, None)
            if row is not None:
                await self._claim(conn, row, bind, deltas)
        await self._add_to_conversations(conn, deltas)

    async def _claim(
        self, conn: Any, row: Any, bind: dict[str, Any] | None, deltas: _Deltas
    ) -> None:
        """Claim a run, once: whoever claims it first (``applied_at IS NULL`` -> now) adds its
        tokens and cost to ``deltas`` (applied to conversations at the end of the transaction).

        ``bind`` is the binding the app's transaction made (its message is filled already);
        without one, a message the run named is filled here, where the app left it empty.
        """
        workflow_id = row.workflow_id
        await self._know_app_schema(conn)
        bind = bind or {}
        message_id = bind.get("message_id") or row.message_id
        claimed = await conn.execute(
            update(RUNS)
            .where(and_(RUNS.c.workflow_id == workflow_id, RUNS.c.applied_at.is_(None)))
            .values(applied_at=time.time(), message_id=message_id)
        )
        if claimed.rowcount != 1:
            return
        if message_id:  # the run's call rows name the message it answers, as its row does
            await conn.execute(
                update(LEDGER)
                .where(and_(LEDGER.c.workflow_id == workflow_id, LEDGER.c.message_id.is_(None)))
                .values(message_id=message_id)
            )
        if not bind and row.message_id:
            await self._fill_named_message(conn, row)
        tokens = bind.get("total_tokens", row.total_tokens)
        cost = bind.get("cost", row.cost)
        conv = bind.get("conversation_id") or row.conversation_id
        deltas.claimed += 1
        if conv is not None and (tokens or cost):
            total = deltas.setdefault(str(conv), [0, Decimal(0)])
            total[0] += tokens or 0
            total[1] += cost or Decimal(0)

    async def _add_to_conversations(self, conn: Any, deltas: _Deltas) -> None:
        """One ``UPDATE`` per conversation, last in the transaction (the app's own updates of
        the row wait for its lock the shortest time) and in id order (two workers, two
        processes, never deadlock on each other)."""
        self.stats["applied"] += deltas.claimed
        if not deltas:
            return
        if not self._conversations_ok:  # the app may have created it since the last look
            await self._know_app_schema(conn, now=True)
        if not self._conversations_ok:  # logged, not raised: a refused batch would block the rest
            warn_once("ledger:conversations", "chatter-otel: table %r with columns %s is not in "
                      "the usage database (%s); conversation totals are not updated until it is "
                      "(see MessageMapping). Usage is still recorded per run in %s",
                      self.mapping.conversations_table, sorted(self._conversation_columns()),
                      self._url.render_as_string(hide_password=True), RUNS.name)  # fmt: skip
            return
        statement = add_statement(self.mapping)
        for conv in sorted(deltas):
            tokens, cost = deltas[conv]
            await conn.execute(statement, {"tokens": tokens, "cost": cost, "conv": conv})

    async def _fill_named_message(self, conn: Any, run: Any) -> None:
        """Fill the message a run named, where the app left it empty or zero (it may have
        saved it before the run ended, or not yet: then the binding fills it on insert)."""
        m, have = self.mapping, self._message_columns
        last = (
            await conn.execute(
                select(LEDGER.c.provider, LEDGER.c.model, LEDGER.c.finish_reason)
                .where(LEDGER.c.workflow_id == run.workflow_id)
                .order_by(LEDGER.c.started_at.desc())
                .limit(1)
            )
        ).first()
        values = {
            m.prompt_tokens: run.input_tokens, m.completion_tokens: run.output_tokens,
            m.total_tokens: run.total_tokens, m.cost: run.cost,
            m.response_time_ms: run.response_time_ms,
            m.provider: last and last.provider, m.model: last and last.model,
            m.finish_reason: last and last.finish_reason,
        }  # fmt: skip
        values = {k: v for k, v in values.items() if k in have and v is not None}
        if not values or m.message_id not in have:
            return
        messages = table(m.messages_table, *(column(k) for k in (*values, m.message_id)))
        await conn.execute(
            update(messages)
            .where(messages.c[m.message_id] == run.message_id)
            .values({k: if_empty(messages.c[k], v) for k, v in values.items()})
        )

    async def _apply_due_runs(self, engine: Any) -> None:
        """Runs no message took within the grace period (streaming endpoints)."""
        cutoff = time.time() - self.grace_s
        async with engine.begin() as conn:
            due = (
                await conn.execute(
                    select(RUNS.c.workflow_id).where(
                        and_(RUNS.c.applied_at.is_(None), RUNS.c.finished_at < cutoff)
                    ).limit(self.batch_size)
                )
            ).scalars().all()  # fmt: skip
            if due:
                await self._claim_all(conn, [(workflow_id, None) for workflow_id in due])
            # The next run to fall due, whoever wrote it: the next sweep is then.
            upcoming = (
                await conn.execute(
                    select(func.min(RUNS.c.finished_at)).where(
                        and_(RUNS.c.applied_at.is_(None), RUNS.c.finished_at >= cutoff)
                    )
                )
            ).scalar()  # fmt: skip
        more = len(due) == self.batch_size  # a full batch: more are due now
        self._sweep_due = time.time() if more else (
            float("inf") if upcoming is None else upcoming + self.grace_s)  # fmt: skip
