"""``chatter-otel``: run the demo, and look up traces during an incident.

    chatter-otel demo                              run the reference workflow, record its trace
    chatter-otel trace TRACE_ID [--json]           one trace as a tree
    chatter-otel find --correlation-id ID [--json] traces of a request (or --conversation-id,
                                                   --message-id), newest first

Traces are read from the local trace store (``--store PATH``, default
``$CHATTER_OTEL_TRACE_STORE`` or ``~/.local/share/chatter-otel/traces.db``). Errors are one line
on stderr with exit code 1 (not found) or 2 (bad input or unreadable store); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
EXIT_NOT_FOUND, EXIT_USAGE = 1, 2


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _store(args: argparse.Namespace):
    from chatter_otel.store import LocalTraceStore, default_store_path

    path = args.store or default_store_path()
    if not os.path.exists(path):
        raise _Fail(f"no trace store at {path} (run the app or `chatter-otel demo` first)", 2)
    return LocalTraceStore(path)


def _demo(args: argparse.Namespace) -> int:
    from chatter_otel.demo import run_demo

    result = run_demo(args.question, store_path=args.store)
    u = result.usage
    print(result.tree)
    print()
    print(f"answer:          {result.answer}")
    print(f"trace_id:        {result.trace_id}")
    print(f"correlation_id:  {result.correlation_id}")
    print(
        f"usage:           prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}"
        f" total_tokens={u.total_tokens} cost={u.cost} {u.cost_currency or ''}".rstrip()
    )
    print(
        f"                 provider={u.provider} model={u.model} llm_calls={u.llm_calls}"
        f" tool_calls={u.tool_calls} response_time_ms={u.response_time_ms}"
    )
    print(f"stored in:       {result.store_path}")
    print(f"look it up:      chatter-otel trace {result.trace_id}")
    print(f"                 chatter-otel find --correlation-id {result.correlation_id}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from chatter_otel import _tree

    trace_id = args.trace_id.strip()
    if not _TRACE_ID.fullmatch(trace_id):
        raise _Fail(f"not a trace id (32 hex digits): {trace_id!r}", EXIT_USAGE)
    records = _store(args).trace(trace_id)
    if not records:
        raise _Fail(f"trace {trace_id.lower()} not found", EXIT_NOT_FOUND)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, default=str))
    else:
        print(_tree.render(records))
    return 0


def _find(args: argparse.Namespace) -> int:
    ids = {
        "correlation_id": args.correlation_id,
        "conversation_id": args.conversation_id,
        "message_id": args.message_id,
    }
    if not any(ids.values()):
        raise _Fail("find needs --correlation-id, --conversation-id or --message-id", EXIT_USAGE)
    found = _store(args).find(**ids, limit=args.limit)
    if not found:
        wanted = ", ".join(f"{k}={v}" for k, v in ids.items() if v)
        raise _Fail(f"no trace found for {wanted}", EXIT_NOT_FOUND)
    if args.json:
        print(json.dumps([asdict(t) for t in found], indent=2))
        return 0
    print(
        f"{'start (UTC)':<24} {'trace_id':<32} {'ms':>9} {'tokens in/out':>14} {'cost':>11}"
        "  status  root"
    )
    for t in found:
        start = datetime.fromtimestamp(t.start_ns / 1e9, tz=timezone.utc).isoformat(
            timespec="milliseconds"
        )[:23]
        tokens = f"{t.input_tokens if t.input_tokens is not None else '-'}/" + (
            f"{t.output_tokens if t.output_tokens is not None else '-'}"
        )
        cost = f"${t.cost:.7f}" if t.cost is not None else "-"
        print(
            f"{start:<24} {t.trace_id:<32} {t.duration_ms:>9.1f} {tokens:>14} {cost:>11}"
            f"  {t.status:<6}  {t.root_name}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatter-otel", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    store_help = "trace store file (default: $CHATTER_OTEL_TRACE_STORE or ~/.local/share/...)"

    demo = sub.add_parser("demo", help="run the reference chat workflow and print its trace")
    demo.add_argument("--question", default="What is the weather in Paris?")
    demo.add_argument("--store", default=None, help=store_help)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("trace", help="show one trace as a tree")
    tr.add_argument("trace_id")
    tr.add_argument("--json", action="store_true", help="machine-readable output")
    tr.add_argument("--store", default=None, help=store_help)
    tr.set_defaults(func=_trace)

    fd = sub.add_parser("find", help="list traces by correlation, conversation or message id")
    fd.add_argument("--correlation-id")
    fd.add_argument("--conversation-id")
    fd.add_argument("--message-id")
    fd.add_argument("--limit", type=int, default=20)
    fd.add_argument("--json", action="store_true", help="machine-readable output")
    fd.add_argument("--store", default=None, help=store_help)
    fd.set_defaults(func=_find)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except _Fail as exc:
        print(f"chatter-otel: {exc}", file=sys.stderr)
        return exc.code
    except sqlite3.Error as exc:
        print(f"chatter-otel: cannot read the trace store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error; keep Python quiet at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
