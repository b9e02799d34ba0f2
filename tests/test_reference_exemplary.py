"""The reference app is exemplary: exact totals and unique sequence numbers under 50 concurrent
chats into one conversation on PostgreSQL; it starts and serves with Redis down."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from chatter_otel.reference.app import Conversation, Message, create_app, create_tables
from chatter_otel.sinks.event_types import EventCategory, UnifiedEvent
from tests.conftest import REDIS_PORT, REDIS_URL
from tests.test_persistence import _Proxy, fresh_pg


@pytest.fixture
async def pg_url() -> Any:
    async with fresh_pg() as url:
        yield url


async def test_fifty_concurrent_chats_into_one_conversation(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHATTER_REDIS_URL", raising=False)
    app = create_app(database_url=pg_url, set_global=False, exporter="none")
    await create_tables(app)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            first = await client.post("/chat", json={"message": "weather in Oslo"})
            cid = first.json()["conversation_id"]
            answers = await asyncio.gather(*(
                client.post("/chat", json={"message": f"weather in Oslo {i}",
                                           "conversation_id": cid})
                for i in range(50)
            ))  # fmt: skip
            assert {r.status_code for r in answers} == {200}
        async with app.state.engine.connect() as conn:
            conv = (await conn.execute(select(Conversation.__table__).where(
                Conversation.id == cid))).one()  # fmt: skip
            msgs = list(await conn.execute(select(Message.__table__).where(
                Message.conversation_id == cid)))  # fmt: skip
        assert sorted(m.sequence_number for m in msgs) == list(range(1, 103))
        assert conv.message_count == 102
        assert conv.total_tokens == sum(m.total_tokens or 0 for m in msgs) > 0
        assert conv.total_cost == sum(m.cost or 0 for m in msgs)
    finally:
        app.state.telemetry.shutdown()
        await app.state.engine.dispose()


async def test_redis_down_at_boot_then_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = _Proxy(REDIS_PORT)
    proxy.cut()  # Redis unreachable when the app starts
    monkeypatch.setenv("CHATTER_REDIS_URL", f"redis://127.0.0.1:{proxy.port}/0")
    app = create_app(database_url=f"sqlite+aiosqlite:///{tmp_path}/app.db", set_global=False,
                     exporter="none")  # fmt: skip
    started = time.monotonic()
    try:
        async with app.router.lifespan_context(app):
            assert time.monotonic() - started < 5  # it starts, it does not wait 10 s and fail
            lines = [r for r in caplog.records if "Redis" in r.getMessage()]
            assert len(lines) == 1 and "events stay in this process" in lines[0].getMessage()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                ok = await client.post("/chat", json={"message": "weather in Lima"})
                assert ok.status_code == 200  # serves with Redis down
            bus = app.state.telemetry.events
            sub = bus.subscribe()
            proxy.restore()  # Redis is back: the bridge subscribes by itself
            import redis.asyncio as redis

            client_r = redis.from_url(REDIS_URL)
            try:
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    numsub = dict(await client_r.pubsub_numsub("chatter-otel:events"))
                    if numsub.get(b"chatter-otel:events"):
                        break
                event = UnifiedEvent(category=EventCategory.WORKFLOW, event_type="from_elsewhere")
                await client_r.publish("chatter-otel:events", json.dumps(
                    {"origin": "other-process", "event": event.to_dict()}))  # fmt: skip
                got = await asyncio.wait_for(sub.get(), 10)
                while got.event_type != "from_elsewhere":
                    got = await asyncio.wait_for(sub.get(), 10)
            finally:
                await client_r.aclose()
            assert any("reached Redis" in r.getMessage() for r in caplog.records)
    finally:
        await app.state.engine.dispose()
        proxy.close()


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chatter_otel")
