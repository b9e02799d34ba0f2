"""A spool that cannot stop the ledger: a bad row is quarantined, an unusable file is set aside
and a fresh one opened, the WAL is checkpointed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from chatter_otel.persistence import LEDGER, UsagePersistence
from tests.test_persistence import Host, _llm_record

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/app.db"


@pytest.fixture
async def host(sqlite_url: str) -> AsyncIterator[Host]:
    """The app's database with its tables (the conftest gives each test its own log limiter)."""
    app = Host(sqlite_url)
    await app.setup()
    yield app
    await app.engine.dispose()


async def test_a_malformed_spool_row_is_quarantined_and_the_rest_flow(
    sqlite_url: str, host: Host, tmp_path: Any, caplog: Any
) -> None:
    path = tmp_path / "spool.db"
    # An earlier run left 120 records, one of them corrupt, second in line.
    p = UsagePersistence(sqlite_url, spool_path=path)
    p.start()
    assert await asyncio.to_thread(p.flush, 10)
    p.close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO spool (kind, payload) VALUES ('llm', ?)", (
            json.dumps(_llm_record("0000000000000001"), default=str),))  # fmt: skip
        db.execute("INSERT INTO spool (kind, payload) VALUES ('llm', '{not json')")
        db.executemany("INSERT INTO spool (kind, payload) VALUES ('llm', ?)", [
            (json.dumps(_llm_record(f"{i:016x}"), default=str),)
            for i in range(2, 120)
        ])  # fmt: skip
    db.close()
    p = UsagePersistence(sqlite_url, spool_path=path)
    p.start()
    try:
        for _ in range(300):  # the replay of what an earlier run left (bounded wait)
            if p.stats["written"] + p.stats["quarantined"] >= 120:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(p.flush, 15), p.stats
        ledger = await host.rows(LEDGER)
        assert len(ledger) == 119
        assert (p.stats["written"], p.stats["quarantined"], p.stats["spooled"]) == (119, 1, 0)
        assert "undecodable usage record" in caplog.text
        db = sqlite3.connect(path)
        (error,) = db.execute("SELECT error FROM quarantine").fetchone()
        assert error.startswith("undecodable: JSONDecodeError")
        # checkpointed: the WAL was folded back into the file
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0
        db.close()
    finally:
        p.close()


async def test_an_unusable_spool_file_is_set_aside(
    sqlite_url: str, host: Host, tmp_path: Any, caplog: Any
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database, just garbage " * 200)  # a corrupt header
    p = UsagePersistence(sqlite_url, spool_path=path)
    p.start()
    try:
        for i in range(1, 6):
            p.submit("llm", _llm_record(f"{i:016x}"))
        assert await asyncio.to_thread(p.flush, 15), p.stats
        assert len(await host.rows(LEDGER)) == 5
        aside = list(tmp_path.glob("spool.db.unusable-*"))
        assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
        assert "was unusable" in caplog.text and "a fresh spool is used" in caplog.text
    finally:
        p.close()


@pytest.fixture
def small_disk(tmp_path: Any) -> Any:
    """A 2 MiB tmpfs: a disk that really fills up (needs root, as the tests run here)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_said_and_recovered_from_without_a_restart(
    sqlite_url: str, host: Host, small_disk: Any, caplog: Any
) -> None:
    p = UsagePersistence(sqlite_url, spool_path=small_disk / "spool.db")
    p.start()
    filler = small_disk / "filler"
    try:
        p.submit("llm", _llm_record("0000000000000001"))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        # fill the disk to the last byte
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        for i in range(2, 202):
            p.submit("llm", _llm_record(f"{i:016x}", model="m" * 200))
        assert not await asyncio.to_thread(p.flush, 2)
        assert "cannot be written (the disk is full)" in caplog.text
        assert "held in memory, retrying" in caplog.text
        filler.unlink()  # space comes back: no restart
        assert await asyncio.to_thread(p.flush, 15), p.stats
        ledger = await host.rows(LEDGER)
        assert sorted(r.span_id for r in ledger) == [f"{i:016x}" for i in range(1, 202)]
        assert (p.stats["dropped"], p.stats["spooled"]) == (0, 0)
        # and the spool's WAL was folded back: the file stays small
        wal = small_disk / "spool.db-wal"
        assert not wal.exists() or wal.stat().st_size < 64 * 1024
    finally:
        p.close()
