"""Per request, in instructions and statements: the reference app with and without chatter-otel.

The reference app (FastAPI, SQLAlchemy async sessions, the chat graph on the local model) is
driven in-process through ``httpx.ASGITransport``: ``POST /chat`` turns of one conversation,
on SQLite (``aiosqlite``) and on PostgreSQL (``asyncpg``). Two configurations per database:

* ``bare``: the same app without the package: ``configure`` is never called, so no
  instrumentation, no processors, no SQL spans (``track_workflow`` then only yields an empty
  run: the app stores no usage);
* ``instrumented``: ``configure(app=..., engines=[engine], persistence=UsagePersistence(...))``,
  the defaults otherwise (events, monitoring, analytics, metrics, the ASGI and SQLAlchemy
  instrumentations), spans through ``BatchSpanProcessor`` to an exporter that drops them.

Instructions under ``valgrind --tool=callgrind`` (every thread of the process: the ledger's
worker and the batch processor count too), each configuration in its own process, twice:
``--short`` and ``--short + --requests`` requests, then ``flush()`` of the ledger; the
difference divided by ``--requests`` is the instructions per request, imports, start-up and
the tables' creation cancelled out. Statements are counted without valgrind: every statement
the app's engine runs (SQLAlchemy's ``before_cursor_execute``), per request; the ledger's own
worker has an engine of its own and is not counted there.

The ledger's batch delay is scaled with callgrind's slow-down. In real time a whole request here
takes about 28 ms, so the app commits a run's rows well before the worker reads the spooled
records (``batch_delay_s``, 0.2 s after they arrive): the worker finds them committed and drops
them. Under callgrind the same request takes about 0.7 s (25 times slower); with 0.2 s the
worker would read every run before the app's commit and write it itself (the app's statement
then claims the run it finds written): about 5.5 M instructions per request (measured on
SQLite) that a real request does not spend. ``--ledger-batch-delay`` (5 s: 0.2 s times that
factor, longer than a whole request under callgrind) keeps the real order of events;
``--ledger-batch-delay 0.2`` measures the other case, a request whose commit comes more than
0.2 s after its run ends.

Needs PostgreSQL for the ``postgresql`` rows: ``CHATTER_OTEL_PG_PORT`` (default 55432), as
``scripts/services.sh`` starts it.

    python -m benchmarks.bench_request [--requests N] [--jobs J] [--db sqlite|postgresql]
        [--parts] [--ledger-batch-delay S] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import asyncio, sys, types
import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from sqlalchemy import event
import chatter_otel.reference.app as ref

class Drop(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS

mode, url, spool, requests = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
batch_delay_s = float(sys.argv[5])
options = {}
if mode == "bare":
    # The same app without the package: configure() is never called.
    ref.configure = lambda **kw: types.SimpleNamespace(events=None, shutdown=lambda: None)
else:
    from chatter_otel.persistence import UsagePersistence
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
    options = {"tracer_provider": provider}
    if mode != "no-ledger":
        options["persistence"] = UsagePersistence(url, spool_path=spool,
                                                   batch_delay_s=batch_delay_s)
    if mode == "no-sinks":
        options.update(events=False, monitoring=False, analytics=False)
    if mode == "no-sql":  # configure() without engines: the app's SQL is not traced
        configure = ref.configure
        ref.configure = lambda **kw: configure(**{**kw, "engines": ()})
app = ref.create_app(url, **options)
statements = 0

def count(*args):
    global statements
    statements += 1

event.listen(app.state.engine.sync_engine, "before_cursor_execute", count)

async def main():
    global statements
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            async def chat(cid):
                body = {"message": "What is the weather in Paris?", "user_id": "u1"}
                if cid:
                    body["conversation_id"] = cid
                got = await client.post("/chat", json=body)
                assert got.status_code == 200, got.text
                return got.json()["conversation_id"]
            cid = await chat(None)
            ledger = getattr(app.state.telemetry, "persistence", None)
            stats = ledger.stats if ledger is not None else {}
            # The ledger's worker looks at the app's tables once a second until they exist
            # (the lifespan made them just now): from then on a turn's accounting is written
            # in the app's own transaction, the path measured here.
            for _ in range(600):
                if ledger is None or ledger.writes_in_transaction:
                    break
                await asyncio.sleep(0.1)
            for _ in range(2):  # warm-up: first-call caches, prepared statements
                await chat(cid)
            before = stats.get("in_transaction", 0)
            statements = 0
            for _ in range(requests):
                await chat(cid)
            print(f"STATEMENTS {statements}")
            print(f"IN_TRANSACTION {stats.get('in_transaction', 0) - before}")
        if ledger is not None:
            assert await asyncio.to_thread(ledger.flush, 30)

asyncio.run(main())
"""

MODES = ("bare", "instrumented")
# --parts: what each part costs, as the instrumented run without it
PARTS = ("no-ledger", "no-sql", "no-sinks")


def _databases() -> dict[str, str]:
    port = int(os.environ.get("CHATTER_OTEL_PG_PORT", "55432"))
    return {"sqlite": "sqlite+aiosqlite:///{dir}/app.db",
            "postgresql": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{{db}}"}  # fmt: skip


def _fresh_database(template: str, tmp: Path) -> str:
    """A database of its own for one process: a new file, or a new PostgreSQL database."""
    if template.startswith("sqlite"):
        d = tmp / uuid.uuid4().hex
        d.mkdir()
        return template.format(dir=d)
    import asyncio

    import asyncpg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    base = template.format(db="postgres").replace("postgresql+asyncpg", "postgresql")

    async def create() -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return template.format(db=name)


def run_one(
    mode: str, template: str, requests: int, valgrind: bool, tmp: Path, *, batch_delay_s: float
) -> tuple[int, int]:
    """(instructions or 0, statements) of one process run of ``requests`` measured requests."""
    url = _fresh_database(template, tmp)
    spool = tmp / f"spool-{uuid.uuid4().hex}.db"
    cmd = [sys.executable, "-c", WORKLOAD, mode, url, str(spool), str(requests),
           str(batch_delay_s)]  # fmt: skip
    if valgrind:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    found = re.search(r"STATEMENTS (\d+)", proc.stdout)
    written = re.search(r"IN_TRANSACTION (\d+)", proc.stdout)
    collected = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None or (valgrind and collected is None):
        raise RuntimeError(f"{mode} {template}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    want = 0 if mode in ("bare", "no-ledger") else requests
    if written is None or int(written.group(1)) != want:  # the path measured is the one meant
        said = [line for line in proc.stderr.splitlines() if "chatter-otel" in line]
        raise RuntimeError(
            f"{mode} {template}: {written and written.group(0)} in-transaction "
            f"ledger writes for {requests} requests (want {want}); {said}"
        )
    return (int(collected.group(1)) if collected else 0), int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), action="append")
    ap.add_argument(
        "--parts",
        action="store_true",
        help="also what the ledger, SQL tracing and the sinks each cost",
    )
    ap.add_argument(
        "--ledger-batch-delay",
        type=float,
        default=5.0,
        help="the ledger's batch_delay_s: 0.2 s scaled by callgrind's slow-down (see above)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dbs = {k: v for k, v in _databases().items() if not args.db or k in args.db}
    modes = MODES + PARTS if args.parts else MODES
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        jobs = [(mode, db, n) for db in dbs for mode in modes
                for n in (args.short, args.short + args.requests)]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            counted = pool.map(
                lambda j: run_one(
                    j[0], dbs[j[1]], j[2], True, tmp, batch_delay_s=args.ledger_batch_delay
                ),
                jobs,
            )
            counts = dict(zip(jobs, counted, strict=True))
    out: dict[str, dict[str, float]] = {}
    for db in dbs:
        n = args.short + args.requests
        per = {m: (counts[m, db, n][0] - counts[m, db, args.short][0]) / args.requests
               for m in modes}  # fmt: skip
        stmts = {m: counts[m, db, n][1] / n for m in modes}
        bare = per["bare"]
        out[db] = {**{m: per[m] for m in modes}, "ratio": (per["instrumented"] - bare) / bare,
                   **{f"statements_{m}": stmts[m] for m in modes}}  # fmt: skip
        print(f"{db}: per POST /chat (callgrind, {args.requests} requests, "
              f"ledger batch delay {args.ledger_batch_delay:g} s)")  # fmt: skip
        print(f"  {'':<14} {'instructions':>14} {'added':>14} {'of bare':>8} {'statements':>11}")
        for m in modes:
            print(f"  {m:<14} {per[m]:>14,.0f} {per[m] - bare:>14,.0f} "
                  f"{(per[m] - bare) / bare:>8.1%} {stmts[m]:>11.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "requests": args.requests}, indent=2))


if __name__ == "__main__":
    main()
