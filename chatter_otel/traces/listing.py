"""Traces as the incident CLI lists them (``find``, ``ls``, ``tail``): one row each, with its
status as a word (``ok``/``ERROR``, readable without colour), tokens, cost and model; within the
terminal's width (``COLUMNS``; 80 columns when piped), the columns that name things giving way
with an ellipsis, never the ids or numbers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console

    from chatter_otel.export.store import TraceSummary

__all__ = ["SHORT_ID", "cost_text", "line", "status_word", "table"]

SHORT_ID = 12  # hex digits of a trace id in ``ls``/``tail``; ``trace`` takes the prefix back


def cost_text(cost: float | None) -> str:
    """One precision everywhere: USD to 7 decimals (a small call costs 1e-5), ``-`` if unknown."""
    return f"${cost:.7f}" if cost is not None else "-"


def status_word(status: str) -> str:
    return "ERROR" if status == "ERROR" else "ok"


def _tokens(t: TraceSummary) -> str:
    tin = t.input_tokens if t.input_tokens is not None else "-"
    tout = t.output_tokens if t.output_tokens is not None else "-"
    return f"{tin}/{tout}"


def _when(t: TraceSummary, fmt: str) -> str:
    return datetime.fromtimestamp(t.start_ns / 1e9, tz=UTC).strftime(fmt)


def table(found: Sequence[TraceSummary], out: Console, *, full_ids: bool) -> Table:
    """``find`` (``full_ids``: the whole trace id, then the root span's name) or ``ls`` (a
    trace id prefix, then model and correlation id)."""
    days = {_when(t, "%m-%d") for t in found}
    one_day = len(days) == 1  # then the date goes in the header
    fmt = "%H:%M:%S" if one_day else "%m-%d %H:%M"
    fixed_headers = [f"UTC {next(iter(days))}" if one_day else "UTC", "status", "ms", "tokens",
                     "cost", "trace id"]  # fmt: skip
    rows = [
        [_when(t, fmt), status_word(t.status), f"{t.duration_ms:.0f}", _tokens(t),
         cost_text(t.cost), t.trace_id if full_ids else t.trace_id[:SHORT_ID]]
        for t in found
    ]  # fmt: skip
    flexible = ["root"] if full_ids else ["model", "correlation id"]
    names = [[t.root_name] if full_ids else [t.model or "-", t.correlation_id or "-"]
             for t in found]  # fmt: skip
    fixed = sum(max(len(h), *(len(r[i]) for r in rows)) + 1 for i, h in enumerate(fixed_headers))
    room = max(out.width - fixed, 4 * len(flexible))
    grid = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    for i, header in enumerate(fixed_headers):
        grid.add_column(header, no_wrap=True, justify="right" if 2 <= i <= 4 else "left")
    # ``ls``: the correlation id (what a person searches by next) is cut last; the model gives
    # way first, down to 8 columns
    widths = [room]
    if not full_ids:
        longest = max(len("correlation id"), *(len(n[1]) for n in names))
        corr = min(longest, max(room - 9, 8))
        widths = [max(room - corr - 1, 8), corr]
    for header, width in zip(flexible, widths, strict=True):
        grid.add_column(header, overflow="ellipsis", no_wrap=True, max_width=max(width, 4))
    for t, row, more in zip(found, rows, names, strict=True):
        grid.add_row(*row, *more, style="red" if t.status == "ERROR" else None)
    return grid


def line(t: TraceSummary) -> str:
    """One ended run, for ``tail``: time, status, duration, tokens, cost, trace id prefix,
    model, correlation id (cut to 80 columns by the caller's console)."""
    return "  ".join([
        _when(t, "%H:%M:%S"), f"{status_word(t.status):<5}", f"{t.duration_ms:>6.0f}ms",
        _tokens(t), cost_text(t.cost), t.trace_id[:SHORT_ID], t.model or "-",
        t.correlation_id or "-",
    ])  # fmt: skip
