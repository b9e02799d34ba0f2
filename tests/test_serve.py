"""``chatter-otel serve --workers N``: the reference app in N worker processes, as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from chatter_otel import LocalTraceStore
from tests.stack import free_port, wait_until

if TYPE_CHECKING:
    from pathlib import Path


def test_serve_with_workers_starts_them_and_every_chat_is_traced(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CHATTER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/app.db",
           "CHATTER_OTEL_TRACE_STORE": str(tmp_path / "traces.db")}  # fmt: skip
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "CHATTER_REDIS_URL", "CHATTER_MODEL_BASE_URL"):
        env.pop(name, None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatter_otel", "serve", "--port", str(port), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "serve --workers 2", timeout=60)

        def chat(i: int) -> Any:
            # a new connection each time, so the kernel spreads them over the workers
            r = httpx.post(f"{base}/chat", json={"message": f"weather in Quito {i}"},
                           headers={"X-Correlation-ID": f"serve-{i}"}, timeout=30)  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(chat, range(24)))
        assert all(r["usage"]["total_tokens"] > 0 for r in replies)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    workers = set(re.findall(r"Started server process \[(\d+)\]", text))
    assert len(workers) == 2, text
    assert "Traceback" not in text, text
    # every worker's runs reach the one trace store, each under its request's id
    store = LocalTraceStore(tmp_path / "traces.db")
    try:
        for i in range(24):
            (hit,) = store.find(correlation_id=f"serve-{i}")
            assert hit.trace_id == replies[i]["trace_id"]
    finally:
        store.close()


def test_a_bad_worker_count_is_one_clear_line() -> None:
    done = subprocess.run([sys.executable, "-m", "chatter_otel", "serve", "--workers", "0"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "'0' is not a number of processes from 1 to 64" in done.stderr
    assert "Traceback" not in done.stderr
