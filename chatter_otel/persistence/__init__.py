"""Usage in the app's ``messages`` and ``conversations`` rows: exactly once, whatever is lost when.

Three parts:

* **Binding** (``binding``, in the app's transaction): hooks on the app's sessions. When the
  app inserts or updates an assistant message right after a run finished in the same context
  (``last_run()``), or the message the run named (``track_workflow(message_id=...)``), the
  message's usage columns are filled where the app left them empty or zero, and, right after
  the app's insert, on the app's own connection, the run's ledger rows, its claim and its
  conversation delta are written: they commit or roll back with the app's message.
* **The ledger** (``chatter_usage_ledger``): one row per LLM call, keyed by span id, and
  ``chatter_usage_runs``: one row per run, keyed by workflow id. The source of truth: message and
  conversation values can always be recomputed from them.
* **The worker** (``ledger``, ``dbloop``, ``writer``, ``spool``): a thread with its own engine
  and event loop (not the app's, and its SQL is never traced) writes in batches
  (``batch_delay_s``, ``batch_size``; ``flush()`` writes now).
  A run's tokens and cost are added to its conversation exactly once, in the transaction that
  *claims* the run row (``applied_at IS NULL`` -> now): by the binding when the app saved a
  message, or after ``grace_s`` when it saved none (streaming endpoints). Every record passes
  through a local SQLite spool; when the database is down it stays there, retried with backoff,
  and is replayed after a restart; primary keys make every replay idempotent. While the spool
  itself cannot be written (locked, corrupt, read-only, full), records go straight to the
  database from a bounded queue in memory (``dbloop``), and the spool is tried again. A record the
  database refuses while it is up is set aside in the spool's ``quarantine`` table (logged and
  counted) so that the records behind it keep flowing.
"""

try:
    import sqlalchemy  # noqa: F401 - only to say which extra is missing
except ImportError as exc:  # pragma: no cover - exercised on a base install
    raise ImportError(
        "chatter_otel.persistence needs the 'persistence' extra: "
        "pip install 'chatter-otel[persistence]'"
    ) from exc

from chatter_otel.persistence.ledger import UsagePersistence
from chatter_otel.persistence.one_statement import write_statement_ddl
from chatter_otel.persistence.processor import LedgerSpanProcessor
from chatter_otel.persistence.schema import LEDGER, RUNS, MessageMapping, metadata

__all__ = [
    "LEDGER",
    "RUNS",
    "LedgerSpanProcessor",
    "MessageMapping",
    "UsagePersistence",
    "metadata",
    "write_statement_ddl",
]
