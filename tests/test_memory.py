"""State stays bounded on write: memory, not time. The default pipeline (local store, ledger on
SQLite, events, monitoring, analytics) runs with a new conversation and user every run; after a
warm-up, what the package itself holds stops growing, whether or not anybody reads it."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

from benchmarks.bench_soak import default_pipeline, soak, soak_app
from chatter_otel.sinks.analytics import LiveAnalytics
from chatter_otel.sinks.monitoring import MonitoringService


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated by the package's own code."""
    kept = snapshot.filter_traces([tracemalloc.Filter(True, "*/chatter_otel/*")])
    return sum(stat.size for stat in kept.statistics("filename"))


def test_memory_stays_flat_after_warm_up(tmp_path: Any) -> None:
    # A 1 s analytics window stands for the default 300 s: the test lasts longer than it.
    analytics = LiveAnalytics(window_s=1.0)
    # No grace: the ledger applies each run to its conversation at its next sweep (no run here
    # saves a message), so every sample can wait until all runs so far are applied.
    tel = default_pipeline(tmp_path, grace_s=0.0, analytics=analytics)
    held: list[int] = []
    rss: list[float] = []
    done = [0]

    def sample(run: int, now_rss: float) -> None:
        # In-flight work (span queues, the ledger's batch, a sweep of 500 runs) is not state:
        # drain it first, or a snapshot taken mid-sweep counts that batch as held.
        done[0] += 500
        assert tel.force_flush() and tel.persistence.flush(20)
        deadline = time.monotonic() + 20
        while tel.persistence.stats["applied"] < done[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tel.persistence.stats["applied"] == done[0], (tel.persistence.stats, done[0])
        held.append(_ours(tracemalloc.take_snapshot()))
        rss.append(now_rss)

    tracemalloc.start(1)
    try:
        # warm-up: imports, caches, pools, the monitoring history (1,000 runs) filling up
        soak(1000, 500, sample)
        soak(1500, 500, sample)
        assert tel.force_flush()
    finally:
        tracemalloc.stop()
        tel.shutdown()
    growth = max(held[2:]) - held[1]
    assert growth < 160 * 1024, f"the package holds {growth / 1024:.0f} KiB more: {held}"
    assert max(rss[2:]) - rss[1] < 24, rss
    assert tel.persistence.stats["dropped"] == 0
    assert analytics.size() <= 4 * 2 * 400  # what a 1 s window holds, not 2,500 runs' worth


def test_the_app_s_request_path_stays_flat(tmp_path: Any) -> None:
    """The reference app's ``POST /chat`` with the ledger on (each turn's accounting written in
    the app's own transaction, the app's sessions hooked, its SQL traced): after a warm-up, what
    the package holds does not grow with the requests."""
    held: list[int] = []

    def sample(run: int, now_rss: float) -> None:
        held.append(_ours(tracemalloc.take_snapshot()))

    tracemalloc.start(1)
    try:
        # A 1 s analytics window and a 100-run monitoring history stand for the defaults
        # (300 s, 1,000 runs): the test lasts longer than them.
        soak_app(f"sqlite+aiosqlite:///{tmp_path}/app.db", tmp_path, 800, 200, sample,
                 analytics=LiveAnalytics(window_s=1.0),
                 monitoring=MonitoringService(history=100))  # fmt: skip
    finally:
        tracemalloc.stop()
    growth = max(held[2:]) - held[1]
    assert growth < 160 * 1024, f"the package holds {growth / 1024:.0f} KiB more: {held}"
