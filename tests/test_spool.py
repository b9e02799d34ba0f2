"""A spool that cannot stop the ledger: a bad row is quarantined, an unusable file is set aside
and a fresh one opened, the WAL is checkpointed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from chatter_otel.persistence import LEDGER, UsagePersistence
from tests.test_persistence import PG, Host, _llm_record, _pg_admin, _Proxy

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


@contextlib.contextmanager
def _tmpfs(where: Any, size: str) -> Any:
    """A real small tmpfs: a disk that really fills up (needs root, as the tests run here)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Any) -> Any:
    with _tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


def _fill(disk: Any) -> Any:
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_a_full_disk_sends_records_straight_to_the_database(
    sqlite_url: str, host: Host, small_disk: Any, caplog: Any
) -> None:
    """The spool's disk is full while the database is up: records are not held back, they go
    straight to the database; when space comes back the spool is used again, no restart."""
    p = UsagePersistence(sqlite_url, spool_path=small_disk / "spool.db")
    p.start()
    try:
        p.submit("llm", _llm_record("0000000000000001"))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        filler = _fill(small_disk)  # to the last byte
        for i in range(2, 202):
            p.submit("llm", _llm_record(f"{i:016x}", model="m" * 200))
        assert await asyncio.to_thread(p.flush, 10), p.stats
        assert "cannot be written (the disk is full)" in caplog.text
        assert "go straight to the database until it can" in caplog.text
        assert len(await host.rows(LEDGER)) == 201
        filler.unlink()  # space comes back: no restart
        await asyncio.sleep(2.1)  # the spool is tried again every 2 s
        for i in range(202, 252):
            p.submit("llm", _llm_record(f"{i:016x}"))
        assert await asyncio.to_thread(p.flush, 15), p.stats
        assert "can be written again" in caplog.text
        ledger = await host.rows(LEDGER)
        assert sorted(r.span_id for r in ledger) == [f"{i:016x}" for i in range(1, 252)]
        assert (p.stats["dropped"], p.stats["spooled"], p.stats["held"]) == (0, 0, 0)
        # and the spool's WAL was folded back: the file stays small
        wal = small_disk / "spool.db-wal"
        assert not wal.exists() or wal.stat().st_size < 64 * 1024
    finally:
        p.close()


async def test_chained_spool_faults_lose_nothing_and_count_nothing_twice(
    tmp_path: Any, caplog: Any
) -> None:
    """On a real 3 MiB tmpfs, one after the other while the ledger runs: the spool corrupted,
    then read-only, then full with the database down, then space back with the database still
    down (the WAL stays bounded), then the database back. Every accepted record is in the
    database once, nothing is dropped, no restart."""
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    proxy = _Proxy()
    host = Host(PG.format(db=name))
    await host.setup()
    n = 0

    def submit(count: int, **kw: Any) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            p.submit("llm", _llm_record(f"{n:016x}", **kw))

    with _tmpfs(tmp_path / "disk", "3m") as disk:
        path = disk / "spool.db"
        p = UsagePersistence(f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{name}",
                             spool_path=path, batch_delay_s=0.05)  # fmt: skip
        p.start()
        try:
            submit(50)
            assert await asyncio.to_thread(p.flush, 15), p.stats
            # 1. corrupt (garbage over the file's header while both connections have it open)
            # and 2. read-only: a read-only mount over the folder (EROFS for every new open and
            # rename: the file can be neither reopened nor set aside)
            with path.open("r+b") as f:
                f.write(b"garbage, not a database " * 40)
            subprocess.run(["mount", "--bind", "-o", "ro", str(disk), str(disk)], check=True)
            try:
                submit(50)
                assert await asyncio.to_thread(p.flush, 15), p.stats
                await asyncio.sleep(2.1)  # the spool is tried again, and fails again
                submit(50)
                assert await asyncio.to_thread(p.flush, 15), p.stats
                assert "cannot be written" in caplog.text
                assert "Read-only file system" in caplog.text
            finally:
                subprocess.run(["umount", str(disk)], check=True)
            await asyncio.sleep(2.1)  # writable again: the corrupt file is set aside
            submit(50)
            assert await asyncio.to_thread(p.flush, 15), p.stats
            assert "was unusable" in caplog.text and "can be written again" in caplog.text
            # 3. writable but full, and the database down: held in memory, nothing written
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
            filler = _fill(disk)
            proxy.cut()
            submit(200, model="m" * 200)
            assert not await asyncio.to_thread(p.flush, 3)
            assert p.stats["dropped"] == 0
            # 4. space back, the database still down: the spool takes the records, its WAL
            # stays bounded however many arrive
            filler.unlink()
            await asyncio.sleep(2.1)  # the spool is tried again every 2 s
            for _ in range(10):
                submit(100, model="m" * 200)
                await asyncio.to_thread(p._intake.flush, 10)
            wal = disk / "spool.db-wal"
            assert not wal.exists() or wal.stat().st_size <= 2 * 1024 * 1024
            assert p.stats["spooled"] > 0
            # 5. the database back: everything lands, once
            proxy.restore()
            assert await asyncio.to_thread(p.flush, 60), p.stats
            ledger = await host.rows(LEDGER)
            assert len(ledger) == n == 1400
            assert sorted(r.span_id for r in ledger) == [f"{i:016x}" for i in range(1, n + 1)]
            assert (p.stats["dropped"], p.stats["held"], p.stats["spooled"]) == (0, 0, 0)
            assert p.stats["written"] >= n
        finally:
            p.close()
            proxy.close()
            await host.engine.dispose()
            await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_what_cannot_be_kept_is_counted_and_said_exactly(tmp_path: Any, caplog: Any) -> None:
    """Stopping while the spool's disk is full and the database is down: the records are lost,
    and the log line and the counter say exactly how many."""
    proxy = _Proxy()
    name = f"chatter_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}")
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        p = UsagePersistence(f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{name}",
                             spool_path=disk / "spool.db")  # fmt: skip
        p.start()
        try:
            assert await asyncio.to_thread(p.flush, 10)
            _fill(disk)
            proxy.cut()
            for i in range(37):
                p.submit("llm", _llm_record(f"{i + 1:016x}", model="m" * 500))
            await asyncio.to_thread(p._intake.flush, 10)
        finally:
            p.close()
            proxy.close()
            await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    assert p.stats["dropped"] == 37
    assert "usage ledger dropped 37 record(s): the ledger stopped while neither" in caplog.text
