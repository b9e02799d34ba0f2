"""The app's side: session hooks that fill the message and account the run in the app's own
transaction (the one write on the app's path, atomic with its commit)."""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import (
    event,
)
from sqlalchemy.orm import Session

from chatter_otel._safety import guarded, warn_once
from chatter_otel.instrumentation.runs import current_workflow, last_run
from chatter_otel.persistence.one_statement import WriteStatement, call_params
from chatter_otel.persistence.schema import (
    RUNS,
    MessageMapping,
    add_statement,
    claim_upsert,
    fit,
    is_empty,
    ledger_row,
    ledger_upsert,
    role_name,
    run_row,
)

if TYPE_CHECKING:
    from chatter_otel.instrumentation.runs import WorkflowRun
    from chatter_otel.persistence.committed import CommittedRows

_log = logging.getLogger("chatter_otel")


class DatabaseRefused(Exception):
    """The write function undid its writes and said why (SQLSTATE and message)."""


class BindingHooks:
    """Mixed into ``UsagePersistence``: its ``before_flush``/``after_flush``/``after_commit``/
    ``after_rollback`` listeners on the app's sessions."""

    mapping: MessageMapping
    bind_window_s: float
    stats: dict[str, int]
    _installed: list[Any]
    _committed: CommittedRows
    _ready: bool
    _conversations_ok: bool
    _write: WriteStatement | None

    if TYPE_CHECKING:

        def submit(self, kind: str, record: dict[str, Any]) -> None: ...

        def _ledger_fit(self, row: dict[str, Any]) -> dict[str, Any]: ...

    def install(self, session_class: Any = Session) -> None:
        """Hook the app's sessions (all of SQLAlchemy's by default; AsyncSession included)."""
        for name, fn in (("before_flush", self._before_flush), ("after_flush", self._after_flush),
                         ("after_commit", self._after_commit),
                         ("after_rollback", self._after_rollback)):  # fmt: skip
            event.listen(session_class, name, fn)
            self._installed.append((session_class, name, fn))

    def uninstall(self) -> None:
        for session_class, name, fn in self._installed:
            event.remove(session_class, name, fn)
        self._installed.clear()

    @guarded
    def _before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        m = self.mapping
        candidates = [
            o for o in (*session.new, *session.dirty)
            if getattr(getattr(o, "__table__", None), "name", None) == m.messages_table
            and role_name(getattr(o, m.role, None)) in m.assistant_roles
        ]  # fmt: skip
        if not candidates:
            return
        active = current_workflow.get()
        if active is not None and active.status == "running":
            # A run is in progress here: a message saved now is not the answer of an earlier
            # run (a named message is filled by the worker once this run has ended).
            return
        run = last_run()
        for msg in candidates:
            if run is None or not self._matches(run, msg):
                continue
            # An app that wrote the usage itself (from track_workflow's run) keeps its own
            # totals too: adding the run to the conversation again would count it twice.
            own = not is_empty(getattr(msg, m.total_tokens, None))
            self._fill(msg, run)
            u = run.usage
            session.info.setdefault("chatter_bindings", []).append(
                {
                    "workflow_id": run.workflow_id,
                    "message_id": str(getattr(msg, m.message_id)),
                    "conversation_id": getattr(msg, m.conversation_id, None),
                    # exact values, the same the message got (span attributes are floats)
                    "total_tokens": 0 if own else u.total_tokens,
                    "cost": Decimal(0) if own else u.cost,
                }
            )
            session.info.setdefault("chatter_runs", {})[run.workflow_id] = run
            run.bound_message_id = str(getattr(msg, m.message_id))
            break  # one run, one message

    @guarded
    def _after_flush(self, session: Session, flush_context: Any) -> None:
        """The message is in the app's transaction now: write the run's ledger rows, claim the
        run and add it to its conversation in the same transaction, so the accounting commits
        (or rolls back) with the app's message. Where that cannot be done (our tables not
        ready, an old database), the binding goes to the worker after the commit instead."""
        runs = session.info.get("chatter_runs")
        if not runs:
            return
        for binding in session.info.get("chatter_bindings", ()):
            run = runs.pop(binding["workflow_id"], None)
            if run is not None and not binding.get("in_transaction"):
                binding["in_transaction"] = self._write_in_transaction(session, binding, run)

    def _write_in_transaction(self, session: Session, binding: dict[str, Any],
                              run: WorkflowRun) -> bool:  # fmt: skip
        record = run.record
        if not (self._ready and self._conversations_ok) or record is None or not record.outermost:
            return False
        conn = session.connection()
        named = binding["message_id"]  # each call row names the message it answers
        calls = [self._ledger_fit({**ledger_row(c), "message_id": c.ids.message_id or named})
                 for c in run.calls]  # fmt: skip
        row = fit(RUNS, run_row(record, applied_at=time.time()))
        row["message_id"] = named
        conv = binding["conversation_id"]
        conv = str(conv) if conv is not None else None
        tokens, cost = binding["total_tokens"] or 0, binding["cost"] or Decimal(0)
        write = self._write
        if write is not None and write.dialect != conn.dialect.name:
            write = None  # the app's engine is not the ledger's kind of database
        # The package's own writes are never traced: the savepoint and its release neither.
        with suppress_instrumentation():
            try:
                if write is None:
                    with conn.begin_nested():  # a refusal of ours never aborts the app's
                        self._write_statements(conn, calls, row, conv=conv, tokens=tokens,
                                               cost=cost)  # fmt: skip
                else:
                    params = call_params(row, calls, conv=conv, tokens=tokens, cost=cost)
                    self._write_one(conn, write, params)
            except Exception as exc:
                warn_once("ledger:in-transaction", "chatter-otel: cannot write the run's usage "
                          "in the app's transaction (%s: %.300s); the ledger's worker writes it "
                          "after the commit", type(exc).__name__, exc)  # fmt: skip
                self.stats["in_transaction_refused"] += 1
                return False
        binding["written"] = (binding["workflow_id"], [c.span_id for c in run.calls])
        self.stats["in_transaction"] += 1
        return True

    @staticmethod
    def _write_one(conn: Any, write: WriteStatement, params: dict[str, Any]) -> None:
        """One statement (``persistence/one_statement.py``) whose failure is undone alone."""
        if not write.returns_refusal:  # SQLite: a refused statement raises, undone alone
            conn.execute(write.statement, params)
            return
        proven = conn.connection.info  # the DBAPI connection's: kept while the pool keeps it
        if proven.get(write.name):
            refused = conn.execute(write.statement, params).scalar()
        else:  # its first call on this connection, where it may not exist: in a savepoint
            with conn.begin_nested():
                refused = conn.execute(write.statement, params).scalar()
            proven[write.name] = True
        if refused is not None:
            raise DatabaseRefused(refused)

    def _write_statements(self, conn: Any, calls: list[dict[str, Any]], row: dict[str, Any],
                          *, conv: str | None, tokens: int, cost: Decimal) -> None:  # fmt: skip
        """Where the function is not (SQLite, an app-managed schema): the claim first (the
        worker takes runs before calls too), the call rows, the conversation if claimed."""
        claimed = conn.execute(claim_upsert(conn), row).rowcount == 1
        if calls:
            conn.execute(ledger_upsert(conn), calls)
        if claimed and conv is not None and (tokens or cost):
            conn.execute(add_statement(self.mapping),
                         {"tokens": tokens, "cost": cost, "conv": conv})  # fmt: skip

    def _matches(self, run: WorkflowRun, msg: Any) -> bool:
        m = self.mapping
        if run.workflow_id is None or run.finished_at is None:
            return False
        message_id = getattr(msg, m.message_id, None)
        if run.message_id is not None:  # the run named its message
            return str(message_id) == run.message_id
        if run.bound_message_id not in (None, str(message_id)):
            return False  # already bound to another message
        if time.time() - run.finished_at > self.bind_window_s:
            return False
        conv = getattr(msg, m.conversation_id, None)
        return run.conversation_id is None or conv is None or str(conv) == run.conversation_id

    def _fill(self, msg: Any, run: WorkflowRun) -> None:
        m, u = self.mapping, run.usage
        for name, value in (
            (m.prompt_tokens, u.prompt_tokens), (m.completion_tokens, u.completion_tokens),
            (m.total_tokens, u.total_tokens), (m.cost, u.cost), (m.provider, u.provider),
            (m.model, u.model), (m.finish_reason, u.finish_reason),
            (m.response_time_ms, u.response_time_ms),
        ):  # fmt: skip
            if value is not None and hasattr(msg, name) and is_empty(getattr(msg, name)):
                setattr(msg, name, value)

    @guarded
    def _after_commit(self, session: Session) -> None:
        session.info.pop("chatter_runs", None)
        for binding in session.info.pop("chatter_bindings", ()):
            written = binding.pop("written", None)
            if not binding.pop("in_transaction", False):  # else it committed with the app's
                self.submit("bind", binding)
            elif written is not None:  # the worker need not write these rows again
                self._committed.add(*written)

    @guarded
    def _after_rollback(self, session: Session) -> None:
        session.info.pop("chatter_bindings", None)
        session.info.pop("chatter_runs", None)

    # -- the worker -----------------------------------------------------------------------------
