"""``chatter-otel``: run the demo, and look up traces during an incident.

    chatter-otel demo                              run the reference workflow, record its trace
    chatter-otel serve [--port P] [--workers N]    run the reference chat app (FastAPI)
    chatter-otel trace TRACE_ID [--json]           one trace as a tree
    chatter-otel find --correlation-id ID [--json] traces of a request (or --conversation-id,
                                                   --message-id), newest first
    chatter-otel ls [--errors] [--since 30m] [--model M] [--conversation ID] [--limit N]
    chatter-otel tail [--errors]                   runs as they end in the local store

Sources: ``--from local`` (default: the local trace store, ``--store PATH``, default
``$CHATTER_OTEL_TRACE_STORE`` or ``~/.local/share/chatter-otel/traces.db``), ``--from jaeger
--url URL [--service NAME]``, ``--from tempo --url URL [--protobuf]`` (URLs also from
``$CHATTER_OTEL_JAEGER_URL`` / ``$CHATTER_OTEL_TEMPO_URL``; ``--header``, ``--ca-bundle`` and
``--insecure`` for a secured backend). Trace ids are taken in hex
or base64. Errors are one line on stderr with exit code 1 (not found) or 2 (bad input, an
unreachable backend, a malformed response); never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_NOT_FOUND, EXIT_USAGE = 1, 2


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration like 90s, 30m, 2h: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _source(args: argparse.Namespace) -> Any:
    from chatter_otel.traces.sources import ENV_HEADERS, Connection, open_source, parse_headers

    connection = None
    if args.source != "local":
        headers = parse_headers(args.header, os.environ.get(ENV_HEADERS))
        connection = Connection(headers, ca_bundle=args.ca_bundle, insecure=args.insecure)
    return open_source(
        args.source, url=args.url, store=args.store, service=getattr(args, "service", None),
        lookback_s=args.lookback, protobuf=args.protobuf, timeout_s=args.timeout,
        max_bytes=int(args.max_response_mb * 2**20), connection=connection,
    )  # fmt: skip


def _demo(args: argparse.Namespace) -> int:
    if args.agents:
        return _agent_demo(args)
    from chatter_otel.reference.demo import run_demo

    result = run_demo(args.question, store_path=args.store)
    u = result.usage
    if args.json:
        doc = {k: v for k, v in asdict(result).items() if k != "tree"}
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(result.tree)
    print()
    print(f"answer:          {result.answer}")
    print(f"trace_id:        {result.trace_id}")
    print(f"correlation_id:  {result.correlation_id}")
    print(
        f"usage:           prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens}"
        f" total_tokens={u.total_tokens}"
    )
    print(f"                 cost={u.cost} {u.cost_currency or ''}".rstrip())
    print(f"                 provider={u.provider} model={u.model}")
    print(
        f"                 llm_calls={u.llm_calls} tool_calls={u.tool_calls}"
        f" response_time_ms={u.response_time_ms}"
    )
    print(f"stored in:       {result.store_path}")
    prog = _prog()
    print(f"look it up:      {prog} trace {result.trace_id}")
    print(f"                 {prog} find --correlation-id {result.correlation_id}")
    return 0


def _agent_demo(args: argparse.Namespace) -> int:
    from chatter_otel.reference.agent_demo import run_agent_demo

    result = run_agent_demo(store_path=args.store)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    print("A prebuilt ReAct agent:")
    print(result.agent_tree)
    print("\nA graph paused by an interrupt (a human must approve):")
    print(result.paused_tree)
    print("\nThe same thread resumed with Command(resume='yes'): a new trace, linked to it:")
    print(result.resumed_tree)
    print(f"\nstored in:       {result.store_path}")
    return 0


def _prog() -> str:
    """How to run this command again as typed here: ``chatter-otel`` when it is on PATH, else
    the path it was started by (``.venv/bin/chatter-otel`` after ``make demo``)."""
    found = shutil.which("chatter-otel")
    argv0 = sys.argv[0] if sys.argv and sys.argv[0].endswith("chatter-otel") else None
    if found and (argv0 is None or os.path.realpath(found) == os.path.realpath(argv0)):
        return "chatter-otel"
    if argv0 is not None:
        return os.path.relpath(argv0)
    return f"{sys.executable} -m chatter_otel"


def _hint(args: argparse.Namespace) -> str:
    return _BATCH_HINT if args.source == "local" else ""


_BATCH_HINT = (
    "; spans reach the store in batches (OTEL_BSP_SCHEDULE_DELAY, 5 s by default): a request "
    "of the last few seconds may not be there yet"
)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from chatter_otel.reference.app import create_app
    except ImportError as exc:
        raise _Fail(
            f"serve needs the reference extra: pip install 'chatter-otel[reference]' ({exc})", 2
        ) from None
    if args.workers == 1:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")
    else:  # each worker process builds its own app (and its own configure()) from the factory
        uvicorn.run("chatter_otel.reference.app:create_app", factory=True, host=args.host,
                    port=args.port, workers=args.workers, log_level="info")  # fmt: skip
    return 0


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes from 1 to 64")
    return n


def _trace(args: argparse.Namespace) -> int:
    from chatter_otel.traces import spans as _tree
    from chatter_otel.traces.sources import normalize_trace_id

    source = _source(args)
    trace_id = _full_trace_id(source, args.trace_id) or normalize_trace_id(args.trace_id)
    records = source.trace(trace_id)
    if not records:
        raise _Fail(f"trace {trace_id} not found" + _hint(args), EXIT_NOT_FOUND)
    if args.html:
        from chatter_otel.traces.html import render_html

        try:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render_html(records))
        except OSError as exc:
            raise _Fail(f"cannot write {args.html}: {exc.strerror or exc}", EXIT_USAGE) from None
        print(f"wrote {args.html}: trace {trace_id}, {len(records)} spans (open it in a browser)")
    elif args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, default=str))
    else:
        _tree.console().print(_tree.tree(records))
    return 0


def _full_trace_id(source: Any, given: str) -> str | None:
    """A prefix of 8 to 31 hex digits (``ls`` shows 12), from the local store: the one trace
    it names; None when ``given`` is not a prefix."""
    text = given.strip().lower()
    if not (8 <= len(text) < 32 and re.fullmatch(r"[0-9a-f]+", text)):
        return None
    if not hasattr(source, "trace_ids_with_prefix"):
        raise _Fail(f"{text}: a trace id prefix needs --from local; give all 32 hex digits",
                    EXIT_USAGE)  # fmt: skip
    ids = source.trace_ids_with_prefix(text)
    if len(ids) != 1:
        raise _Fail(f"no trace id starts with {text}" if not ids else
                    f"{text} starts more than one trace id: give more digits",
                    EXIT_NOT_FOUND if not ids else EXIT_USAGE)  # fmt: skip
    return str(ids[0])


def _find(args: argparse.Namespace) -> int:
    ids = {
        "correlation_id": args.correlation_id,
        "conversation_id": args.conversation_id,
        "message_id": args.message_id,
    }
    if not any(ids.values()):
        raise _Fail("find needs --correlation-id, --conversation-id or --message-id", EXIT_USAGE)
    found = _source(args).find(**ids, limit=args.limit)
    if not found:
        wanted = ", ".join(f"{k}={v}" for k, v in ids.items() if v)
        raise _Fail(f"no trace found for {wanted}" + _hint(args), EXIT_NOT_FOUND)
    return _print_list(args, found, full_ids=True)


def _print_list(args: argparse.Namespace, found: list[Any], *, full_ids: bool) -> int:
    if args.json:
        print(json.dumps([asdict(t) for t in found], indent=2))
        return 0
    from chatter_otel.traces.listing import table
    from chatter_otel.traces.spans import console

    out = console()
    out.print(table(found, out, full_ids=full_ids))
    return 0


EXIT_ERRORS_FOUND = 3


def _ls(args: argparse.Namespace) -> int:
    import time

    source = _source(args)
    since = time.time_ns() - int(args.since * 1e9) if args.since is not None else None
    found = source.recent(limit=args.limit, since_ns=since, errors=args.errors, model=args.model,
                          conversation_id=args.conversation)  # fmt: skip
    if not found and not args.errors:
        raise _Fail("no traces" + (" matching the filters" if args.model or args.conversation
                                   or since else "") + _hint(args), EXIT_NOT_FOUND)  # fmt: skip
    if found or args.json:
        _print_list(args, found, full_ids=False)
    elif not args.json:
        print("no failed runs")
    return EXIT_ERRORS_FOUND if args.errors and found else 0


def _tail(args: argparse.Namespace) -> int:
    import time

    from chatter_otel.traces.listing import line
    from chatter_otel.traces.spans import console

    store = _source(args)
    if not hasattr(store, "ended_since"):
        raise _Fail("tail reads the local trace store (--from local)", EXIT_USAGE)
    out = console()
    last = store.last_rowid()
    try:
        while True:
            last, ended = store.ended_since(last)
            for t in ended:
                if args.errors and t.status != "ERROR":
                    continue
                if args.json:
                    print(json.dumps(asdict(t)), flush=True)
                else:
                    out.print(line(t), style="red" if t.status == "ERROR" else None,
                              overflow="ellipsis", no_wrap=True, crop=True)  # fmt: skip
                    out.file.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C ends it: not an error
        return 0


_DESCRIPTION = """\
Run the demo, and look up traces during an incident.

  chatter-otel demo                      run the reference workflow
  chatter-otel serve                     run the reference chat app
  chatter-otel ls [--errors]             recent runs, newest first
  chatter-otel tail                      runs as they end (Ctrl-C ends it)
  chatter-otel find --correlation-id ID  the traces of a request
  chatter-otel trace TRACE_ID            one trace as a tree (or an id prefix)
  chatter-otel trace ID --html FILE      ...as a page, for a browser or a ticket

Errors are one line on stderr: exit 1 when nothing was found, 2 for bad input,
an unreachable backend or a malformed response; `ls --errors` exits 3 when it
lists failed runs."""


def _parser() -> argparse.ArgumentParser:
    from chatter_otel.version import __version__

    parser = argparse.ArgumentParser(
        prog="chatter-otel", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"chatter-otel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    store_help = "trace store file (default: $CHATTER_OTEL_TRACE_STORE or ~/.local/share/...)"

    demo = sub.add_parser("demo", help="run the reference chat workflow and print its trace")
    demo.add_argument("--question", default="What is the weather in Paris?",
                      help="what to ask the reference workflow")  # fmt: skip
    demo.add_argument("--store", default=None, help=store_help)
    demo.add_argument(
        "--agents", action="store_true",
        help="run a ReAct agent and an interrupted, resumed graph instead",
    )  # fmt: skip
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=_demo)

    sv = sub.add_parser("serve", help="run the reference chat app (FastAPI) on embedded defaults")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument(
        "--workers", type=_workers, default=1, metavar="N",
        help="app worker processes (uvicorn's), each with its own telemetry; set "
        "CHATTER_REDIS_URL so /events shows every worker's runs",
    )  # fmt: skip
    sv.set_defaults(func=_serve)
    _add_lookups(sub, store_help)
    return parser


def _add_lookups(sub: Any, store_help: str) -> None:
    """trace, find, ls, tail: the commands that read traces, and where they read them."""

    def add_source(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from", dest="source", choices=("local", "jaeger", "tempo"),
                       default="local", help="where to read traces (default: local)")  # fmt: skip
        p.add_argument("--url", help="Jaeger query or Tempo base URL (default: "
                       "$CHATTER_OTEL_JAEGER_URL / $CHATTER_OTEL_TEMPO_URL)")  # fmt: skip
        p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="jaeger/tempo: a request header, e.g. Authorization (repeatable; "
                       "also $CHATTER_OTEL_QUERY_HEADERS=name=value,...)")  # fmt: skip
        p.add_argument(
            "--ca-bundle",
            metavar="FILE",
            help="jaeger/tempo: trust this CA for https (else the system's)",
        )
        p.add_argument("--insecure", action="store_true",
                       help="jaeger/tempo: do not check the https certificate")  # fmt: skip
        p.add_argument("--store", default=None, help=store_help)
        p.add_argument("--protobuf", action="store_true", help="tempo: ask for protobuf")
        p.add_argument("--lookback", type=_seconds, default=3600.0,
                       help="jaeger/tempo search window, e.g. 30m, 2h (default 1h)")  # fmt: skip
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=30.0,
            help="jaeger/tempo: give up after this long in all (default 30s)",
        )
        p.add_argument(
            "--max-response-mb",
            type=float,
            default=32.0,
            help="jaeger/tempo: refuse a larger response (default 32)",
        )

    def add_search(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
        p.add_argument("--service", help="jaeger: the app's service.name (its search needs it)")
        add_source(p)

    tr = sub.add_parser("trace", help="show one trace as a tree")
    tr.add_argument("trace_id", help="32 hex digits, base64 of 16 bytes, or (local) a prefix")
    html_help = "write the trace as one self-contained page (a waterfall) to FILE"
    tr.add_argument("--html", metavar="FILE", help=html_help)
    add_source(tr)
    tr.set_defaults(func=_trace)

    fd = sub.add_parser("find", help="list traces by correlation, conversation or message id")
    fd.add_argument("--correlation-id", help="the X-Correlation-ID of the request")
    fd.add_argument("--conversation-id", help="gen_ai.conversation.id")
    fd.add_argument("--message-id", help="chatter.message.id")
    add_search(fd)
    fd.set_defaults(func=_find)

    ls = sub.add_parser("ls", help="recent runs, newest first")
    errors_help = f"only failed runs; exit {EXIT_ERRORS_FOUND} when there are some"
    ls.add_argument("--errors", action="store_true", help=errors_help)
    ls.add_argument("--since", type=_seconds, default=None, help="only runs of the last 30m, 2h...")
    ls.add_argument("--model", help="only runs that called this model")
    ls.add_argument("--conversation", help="only runs of this gen_ai.conversation.id")
    add_search(ls)
    ls.set_defaults(func=_ls)

    tl = sub.add_parser("tail", help="runs as they end in the local store (Ctrl-C ends it)")
    tl.add_argument("--errors", action="store_true", help="only failed runs")
    tl.add_argument("--interval", type=_seconds, default=1.0, help="poll every (default 1s)")
    add_source(tl)
    tl.set_defaults(func=_tail)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from chatter_otel.traces.sources import SourceError

    try:
        return int(args.func(args))
    except (_Fail, SourceError) as exc:
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
