"""Attribute keys that the OpenTelemetry semantic conventions do not define (yet).

Everything a span carries comes either from ``opentelemetry.semconv`` or from here; no other
module spells an attribute name. Keys of our own start with ``chatter.``; the GenAI cost keys and
the LangGraph node keys follow the names the design contract fixes for them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "APP_MISMATCH_METRIC",
    "BUDGET_EXCEEDED",
    "BUDGET_EXCEEDED_METRIC",
    "CHATTER_BUDGET_LIMIT",
    "CHATTER_BUDGET_THRESHOLD",
    "CHATTER_BUDGET_VALUE",
    "CHATTER_CANCELLED",
    "CHATTER_CORRELATION_ID",
    "CHATTER_INTERRUPTED",
    "CHATTER_LLM_CALLS",
    "CHATTER_MESSAGE_ID",
    "CHATTER_RETRIEVAL_DOCUMENTS",
    "CHATTER_TOOL_CALLS",
    "CHATTER_USAGE_ESTIMATED",
    "CHATTER_USAGE_ESTIMATOR",
    "CHATTER_USAGE_FIELD",
    "CHATTER_USAGE_MISSING",
    "CHATTER_USAGE_SOURCE",
    "CHATTER_USAGE_TOTAL_TOKENS",
    "CHATTER_WORKFLOW_ID",
    "COST_METRIC",
    "EVENTS_REDIS_LOST_METRIC",
    "EVENTS_REDIS_RECONNECTS_METRIC",
    "EVENTS_REJECTED_METRIC",
    "EXECUTE_TOOL_DURATION_METRIC",
    "GEN_AI_USAGE_COST_AMOUNT",
    "GEN_AI_USAGE_COST_CURRENCY",
    "GEN_AI_USAGE_COST_PRICE_TABLE",
    "GEN_AI_USAGE_COST_SOURCE",
    "INVOKE_AGENT_DURATION_METRIC",
    "INVOKE_WORKFLOW_DURATION_METRIC",
    "LANGGRAPH_CHECKPOINT_ID",
    "LANGGRAPH_INTERRUPT_IDS",
    "LANGGRAPH_NODE_NAME",
    "LANGGRAPH_STEP",
    "LANGGRAPH_THREAD_ID",
    "LEDGER_DROPPED_METRIC",
    "LEDGER_QUARANTINED_METRIC",
    "LEDGER_SPOOLED_METRIC",
    "LEDGER_WRITTEN_METRIC",
    "ORPHANED_ERROR_TYPE",
]

CHATTER_CORRELATION_ID: Final = "chatter.correlation.id"
"""The request's correlation id (``X-Correlation-ID``), on every span when known."""

CHATTER_MESSAGE_ID: Final = "chatter.message.id"
"""The app's message id that a run answers, when known."""

CHATTER_WORKFLOW_ID: Final = "chatter.workflow.id"
"""The id of the outermost workflow run (the span id of its ``invoke_workflow`` span, in hex)."""

CHATTER_USAGE_MISSING: Final = "chatter.usage.missing"
"""``True`` on a ``chat`` span whose provider reported no token usage; no zeros are invented."""

CHATTER_USAGE_ESTIMATED: Final = "chatter.usage.estimated"
"""``True`` on a ``chat`` span whose token counts are an opt-in estimate (``estimate_usage``),
not the provider's; on a workflow span when any of its calls' counts is."""

CHATTER_USAGE_ESTIMATOR: Final = "chatter.usage.estimator"
"""How an estimate counted: ``tiktoken:o200k_base``, ``chars/4`` or ``custom``."""

CHATTER_USAGE_TOTAL_TOKENS: Final = "chatter.usage.total_tokens"
"""Total tokens of a call or a run, by the one rule of docs/decisions.md ("Totals"): the
provider's total when it reports one, else input + output. The conventions define no total."""

CHATTER_RETRIEVAL_DOCUMENTS: Final = "chatter.retrieval.documents"
"""How many documents a retrieval returned (the conventions define the documents, not a count)."""

CHATTER_LLM_CALLS: Final = "chatter.llm.calls"
"""Roll-up on ``invoke_workflow``: LLM calls made inside the workflow, nested workflows included."""

CHATTER_TOOL_CALLS: Final = "chatter.tool.calls"
"""Roll-up on ``invoke_workflow``: tool calls made inside the workflow."""

CHATTER_CANCELLED: Final = "chatter.cancelled"
"""``True`` when the operation was cancelled or its stream closed early by the consumer."""

CHATTER_INTERRUPTED: Final = "chatter.interrupted"
"""``True`` on a workflow or node stopped by a LangGraph interrupt (human-in-the-loop); not an
error."""

GEN_AI_USAGE_COST_AMOUNT: Final = "gen_ai.usage.cost.amount"
"""Cost of the call (or the roll-up) as a float in ``gen_ai.usage.cost.currency``."""

GEN_AI_USAGE_COST_CURRENCY: Final = "gen_ai.usage.cost.currency"
"""ISO 4217 currency of the cost, ``USD`` for prices from ``genai-prices``."""

GEN_AI_USAGE_COST_SOURCE: Final = "gen_ai.usage.cost.source"
"""``provider`` when the provider reported the cost, ``local`` when computed here."""

GEN_AI_USAGE_COST_PRICE_TABLE: Final = "gen_ai.usage.cost.price_table"
"""The price table a computed cost came from, with its version: ``genai-prices 0.2.3``
(``, updated <UTC time>`` for data it fetched since) or ``override <digest>`` (the app's)."""

LANGGRAPH_NODE_NAME: Final = "langgraph.node.name"
"""The LangGraph node a ``invoke_node`` span runs."""

LANGGRAPH_STEP: Final = "langgraph.step"
"""The Pregel superstep the node ran in (an int)."""

LANGGRAPH_THREAD_ID: Final = "langgraph.thread.id"
"""The ``thread_id`` of a paused or resuming run (``configurable.thread_id``)."""

LANGGRAPH_CHECKPOINT_ID: Final = "langgraph.checkpoint.id"
"""The checkpoint a run paused at, or resumes from: what joins the two runs in a backend."""

LANGGRAPH_INTERRUPT_IDS: Final = "langgraph.interrupt.ids"
"""The ids of the ``Interrupt`` objects that paused a run (string array)."""

ORPHANED_ERROR_TYPE: Final = "chatter.orphaned"
"""``error.type`` of a span that the bounded run registry had to end (its run never finished)."""


# Metric names of our own (the GenAI ones come from opentelemetry.semconv).

COST_METRIC: Final = "chatter.gen_ai.cost"
"""Counter of the cost of GenAI calls (USD), where it could be priced."""

EVENTS_REJECTED_METRIC: Final = "chatter.events.rejected"
"""Events dropped at a boundary (Redis in, SSE out, forwarding) for failing validation."""

EVENTS_REDIS_LOST_METRIC: Final = "chatter.events.redis.lost"
"""Events this process could not publish to Redis (other processes never saw them)."""

EVENTS_REDIS_RECONNECTS_METRIC: Final = "chatter.events.redis.reconnects"
"""Times the Redis event subscription was lost and made again."""

LEDGER_WRITTEN_METRIC: Final = "chatter.usage.ledger.written"
"""Counter of usage-ledger records written to the database."""

LEDGER_DROPPED_METRIC: Final = "chatter.usage.ledger.dropped"
"""Counter of usage-ledger records dropped (queue or spool full)."""

LEDGER_QUARANTINED_METRIC: Final = "chatter.usage.ledger.quarantined"
"""Counter of usage-ledger records the database rejected; kept aside in the spool file."""

LEDGER_SPOOLED_METRIC: Final = "chatter.usage.ledger.spooled"
"""Gauge of usage-ledger records waiting in the local spool for the database."""

SPANS_DROPPED_METRIC: Final = "chatter.spans.dropped"
"""Counter of finished spans that never left the process, by ``error.type``: ``queue_full``
(the batch processor's queue), ``export_failed`` (the exporter gave up after its retries),
``already_shutdown``; and ``chatter.exporter`` (otlp, local, console)."""

EVENTS_UNSIGNED_METRIC: Final = "chatter.events.unsigned"
"""Events from Redis dropped because a signing secret is set and theirs is missing or wrong."""

INVOKE_WORKFLOW_DURATION_METRIC: Final = "gen_ai.invoke_workflow.duration"
"""Histogram of workflow run durations (s), as ``opentelemetry-util-genai`` names it (the
semantic conventions package has no constant for it yet)."""

INVOKE_AGENT_DURATION_METRIC: Final = "gen_ai.invoke_agent.duration"
"""Histogram of agent run durations (s), as ``opentelemetry-util-genai`` names it."""

EXECUTE_TOOL_DURATION_METRIC: Final = "gen_ai.execute_tool.duration"
"""Histogram of tool call durations (s), as ``opentelemetry-util-genai`` names it."""

BUDGET_EXCEEDED: Final = "chatter.budget.exceeded"
"""Span event on the LLM call whose usage crossed a ``BudgetOptions`` limit."""

BUDGET_EXCEEDED_METRIC: Final = "chatter.budget.exceeded"
"""Counter of runs and conversations that crossed a budget limit, by ``chatter.budget.limit``."""

CHATTER_BUDGET_LIMIT: Final = "chatter.budget.limit"
"""Which limit: ``run_tokens``, ``run_cost``, ``conversation_tokens``, ``conversation_cost``."""

CHATTER_BUDGET_VALUE: Final = "chatter.budget.value"
"""What the run or conversation had spent when it crossed the limit."""

CHATTER_BUDGET_THRESHOLD: Final = "chatter.budget.threshold"
"""The limit it crossed."""

APP_MISMATCH_METRIC: Final = "chatter.usage.app_mismatch"
"""Counter of runs whose usage the app reported itself with numbers other than the measured
ones, by ``chatter.usage.field`` (``total_tokens``, ``cost``) and ``chatter.usage.source``
(``monitoring``: its MonitoringService; ``events``: its own workflow events)."""

CHATTER_USAGE_FIELD: Final = "chatter.usage.field"
"""Which usage number an ``app_mismatch`` is about: ``total_tokens`` or ``cost``."""

CHATTER_USAGE_SOURCE: Final = "chatter.usage.source"
"""Where the app reported it: ``monitoring`` or ``events``."""
