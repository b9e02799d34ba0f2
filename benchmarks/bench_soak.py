"""Soak: does memory stay flat over a long run of the default pipeline?

``RUNS`` runs (default 1,000,000) of the reference workflow (2 LLM calls, 1 tool call) under
``configure`` with everything on as an app runs it: the local trace store, the usage ledger on
SQLite (its spool included), the event bus, live analytics and the built-in monitoring. Every
run has a conversation of its own and one of 50,000 users, so every keyed structure sees new
keys all the time (the worst case for memory). RSS is sampled every ``--every`` runs
(default 50,000) and printed as a table: run, RSS MiB, growth since the first sample after
warm-up, runs per second. The run fails (exit 1) when RSS after warm-up grows by more than
``--max-growth-mb`` (default 32).

    python -m benchmarks.bench_soak [--runs N] [--every K] [--max-growth-mb M] [--json PATH]

``--app URL`` soaks the reference app instead: ``POST /chat`` in-process (ASGI), each turn's
accounting written in the app's own transaction on ``URL`` (SQLite or PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider

from chatter_otel import configure
from chatter_otel.persistence import UsagePersistence
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

if TYPE_CHECKING:
    from collections.abc import Callable

    from chatter_otel.telemetry import Telemetry

INPUT = {"messages": [HumanMessage("What is the weather in Paris?")]}


def rss_mib() -> float:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def default_pipeline(folder: Path, *, grace_s: float = 30.0, **options: Any) -> Telemetry:
    """``configure`` as an app runs it, everything on, files under ``folder``; ``grace_s`` is
    the ledger's wait for a message before it applies a run to its conversation."""
    persistence = UsagePersistence(f"sqlite+aiosqlite:///{folder}/app.db",
                                   spool_path=folder / "spool.db", grace_s=grace_s)  # fmt: skip
    return configure(
        tracer_provider=TracerProvider(), exporter="local", trace_store=folder / "traces.db",
        persistence=persistence, prices=LOCAL_MODEL_PRICES, set_global=False, **options,
    )  # fmt: skip


def soak(runs: int, every: int, on_sample: Callable[[int, float], None]) -> None:
    """``runs`` runs of the workflow, each with new ids; ``on_sample(run, rss)`` every
    ``every`` runs (the pipeline is set up by the caller)."""
    graph = build_chat_graph()
    for i in range(1, runs + 1):
        graph.invoke(INPUT, {"configurable": {"thread_id": f"conv-{i}"},
                             "metadata": {"user_id": f"user-{i % 50_000}"}})  # fmt: skip
        if i % every == 0:
            on_sample(i, rss_mib())


def soak_app(url: str, folder: Path, runs: int, every: int,
             on_sample: Callable[[int, float], None], **options: Any) -> None:  # fmt: skip
    """``runs`` ``POST /chat`` of the reference app (in-process, ASGI), each a new conversation
    of one of 50,000 users, with the ledger on ``url``: every turn's accounting written in the
    app's transaction, the app's sessions hooked, its SQL traced, the sweep scheduling runs.
    ``options`` go to ``configure``."""
    import asyncio

    import httpx

    from chatter_otel.reference.app import create_app

    persistence = UsagePersistence(url, spool_path=folder / "spool.db")
    app = create_app(url, tracer_provider=TracerProvider(), persistence=persistence, **options)

    async def drive() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for i in range(1, runs + 1):
                    body = {"message": "What is the weather in Paris?",
                            "user_id": f"user-{i % 50_000}"}  # fmt: skip
                    got = await client.post("/chat", json=body)
                    if got.status_code != 200:
                        raise SystemExit(f"chat {i}: {got.status_code} {got.text[:300]}")
                    if i % every == 0:
                        on_sample(i, rss_mib())
            assert await asyncio.to_thread(persistence.flush, 60), persistence.stats
            print(f"ledger: {persistence.stats}")

    asyncio.run(drive())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=50_000)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="runs before the baseline sample (default: one --every)",
    )
    parser.add_argument("--max-growth-mb", type=float, default=32.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--app", default=None, metavar="URL",
                        help="soak the reference app's POST /chat on this database instead "
                        "(sqlite+aiosqlite:///... or postgresql+asyncpg://...; '{dir}' is the "
                        "soak's temporary folder)")  # fmt: skip
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else args.every
    samples: list[dict[str, float]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tel = None if args.app else default_pipeline(Path(folder))
        what = "POST /chat of the reference app" if args.app else "runs of the default pipeline"
        print(f"soak: {args.runs} {what}, RSS every {args.every}")
        print(f"{'run':>9} {'RSS MiB':>9} {'growth':>8} {'runs/s':>8}")
        base: list[float] = []
        last = [start, 0]

        def sample(run: int, rss: float) -> None:
            now = time.perf_counter()
            rate = (run - last[1]) / (now - last[0])
            last[:] = [now, run]
            if run >= warmup and not base:
                base.append(rss)
            growth = rss - base[0] if base else 0.0
            samples.append({"run": run, "rss_mib": rss, "growth_mib": growth, "runs_s": rate})
            print(f"{run:>9} {rss:>9.1f} {growth:>+8.1f} {rate:>8.0f}", flush=True)

        if args.app:
            soak_app(args.app.format(dir=folder), Path(folder), args.runs, args.every, sample)
        else:
            assert tel is not None
            try:
                soak(args.runs, args.every, sample)
                tel.force_flush()
            finally:
                tel.shutdown()
    growth = max((s["growth_mib"] for s in samples), default=0.0)
    print(f"soak: largest growth after warm-up {growth:+.1f} MiB "
          f"(allowed {args.max_growth_mb:.0f}); {time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "max_growth_mib": growth}))
    raise SystemExit(1 if growth > args.max_growth_mb else 0)


if __name__ == "__main__":
    main()
