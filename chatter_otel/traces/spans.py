"""A trace as an indented tree: span, duration, status, model, tokens, cost, correlation id."""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from chatter_otel.attributes import (
    CHATTER_CORRELATION_ID,
    CHATTER_INTERRUPTED,
    CHATTER_USAGE_MISSING,
    GEN_AI_USAGE_COST_AMOUNT,
    LANGGRAPH_CHECKPOINT_ID,
)
from chatter_otel.traces.listing import cost_text

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


@dataclass(slots=True)
class SpanRecord:
    """One finished span, independent of where it was read from."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    status: str  # "OK", "ERROR" or "UNSET"
    status_message: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "INTERNAL"
    service: str | None = None

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def from_readable(span: Any) -> SpanRecord:
    """A ``SpanRecord`` from an SDK ``ReadableSpan``."""
    ctx = span.context
    return SpanRecord(
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_id=format(span.parent.span_id, "016x") if span.parent else None,
        name=span.name,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status=span.status.status_code.name,
        status_message=span.status.description or "",
        attributes=dict(span.attributes or {}),
        kind=span.kind.name,
        service=(span.resource.attributes.get("service.name") if span.resource else None),
    )


def _number(value: Any) -> int | float | None:
    """A count or an amount as a backend sent it, if it is one (a string, a list: not shown)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _details(rec: SpanRecord) -> str:
    a = rec.attributes
    parts = [f"{rec.duration_ms:.1f} ms"]
    if rec.status == "ERROR":
        parts.append(f"ERROR {a.get(ERROR_TYPE, '')}".rstrip())
        if rec.status_message:  # recorded only where capture allowed it (else scrubbed)
            parts.append(repr(rec.status_message[:200]))
    model = a.get(GEN_AI_RESPONSE_MODEL) or a.get(GEN_AI_REQUEST_MODEL)
    if model:
        parts.append(f"model={model}")
    tin, tout = (
        _number(a.get(GEN_AI_USAGE_INPUT_TOKENS)),
        _number(a.get(GEN_AI_USAGE_OUTPUT_TOKENS)),
    )
    if tin is not None or tout is not None:
        parts.append(
            f"tokens={tin if tin is not None else '?'}/{tout if tout is not None else '?'}"
        )
    if a.get(CHATTER_USAGE_MISSING):
        parts.append("usage=missing")
    cost = _number(a.get(GEN_AI_USAGE_COST_AMOUNT))
    if cost is not None:
        parts.append(f"cost={cost_text(cost)}")
    checkpoint = a.get(LANGGRAPH_CHECKPOINT_ID)
    checkpoint = checkpoint if isinstance(checkpoint, str) else None
    if a.get(CHATTER_INTERRUPTED) is True:  # a human-in-the-loop pause: where it can resume
        parts.append("paused" + (f" at checkpoint {checkpoint}" if checkpoint else ""))
    elif checkpoint:  # a resumed run names the checkpoint it continued from
        parts.append(f"resumed from checkpoint {checkpoint}")
    return "  ".join(parts)


def tree(records: Iterable[SpanRecord]) -> Tree:
    """The spans of one trace as a ``rich`` tree, children in start order; orphans at the root.
    Iterative, each span once: a backend may send a 100,000-deep chain, or ids that loop."""
    recs = sorted(records, key=lambda r: r.start_ns)
    ids = {r.span_id for r in recs}
    children: dict[str | None, list[SpanRecord]] = {}
    for r in recs:
        parent = r.parent_id if r.parent_id in ids else None
        children.setdefault(parent, []).append(r)
    head = "trace"
    if recs:
        corr = next((r.attributes.get(CHATTER_CORRELATION_ID) for r in recs if
                     r.attributes.get(CHATTER_CORRELATION_ID)), None)  # fmt: skip
        head = f"trace {recs[0].trace_id}" + (f"  correlation_id={corr}" if corr else "")
    root = Tree(Text(head, style="bold"), guide_style="dim")
    seen: set[int] = set()
    stack: list[tuple[SpanRecord, Tree]] = [(r, root) for r in reversed(children.get(None, []))]
    while stack:
        rec, under = stack.pop()
        if id(rec) in seen:
            continue
        seen.add(id(rec))
        label = Text(rec.name, style="bold red" if rec.status == "ERROR" else "")
        label.append("  " + _details(rec), style="dim" if rec.status != "ERROR" else "red")
        node = under.add(label)
        stack.extend((kid, node) for kid in reversed(children.get(rec.span_id, [])))
    return root


def console(file: IO[str] | None = None) -> Console:
    """A console for our output: colour only on a terminal (and never with ``NO_COLOR``), the
    terminal's width there or ``COLUMNS`` when set, else 80 columns (pipes, files, tests)."""
    out = file or sys.stdout
    tty = out.isatty()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) >= 40 else None if tty else 80
    return Console(file=out, width=width, color_system="auto" if tty else None,
                   highlight=False, soft_wrap=False)  # fmt: skip


def render(records: Iterable[SpanRecord], width: int = 80) -> str:
    """The tree as plain text, ``width`` columns at most (labels wrap under their guide)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(tree(records))
    return buf.getvalue().rstrip("\n")
