"""The reference app: a small FastAPI chat service shaped like the host apps this package serves.

Conversations and messages live in SQLAlchemy 2 (async) tables; ``POST /chat`` runs the
reference workflow and stores the user and assistant messages, the assistant's with its usage
from ``track_workflow``; ``POST /chat/stream`` streams the answer as server-sent events and stores
it the same way; ``GET /conversations/{id}`` reads them back; ``GET /events`` streams the
lifecycle events (optionally ``?conversation_id=`` / ``?user_id=``) as server-sent events. One
``configure(...)`` at startup turns everything on. Embedded defaults: SQLite
(``CHATTER_DATABASE_URL``), the local trace store, the local chat model;
``CHATTER_MODEL_BASE_URL`` (+ ``CHATTER_MODEL``, ``OPENAI_API_KEY``) points it at any
OpenAI-compatible endpoint instead, ``CHATTER_REDIS_URL`` shares the event stream between
workers, and the ``OTEL_*`` variables point it at a collector.

    chatter-otel serve --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal  # noqa: TC003 - SQLAlchemy resolves Mapped[Decimal] at runtime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel, Field, SecretStr
from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    Numeric,
    String,
    Text,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from chatter_otel._safety import warn_once
from chatter_otel.instrumentation.workflow import track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES, LocalChatModel
from chatter_otel.setup import configure
from chatter_otel.sinks.sse import sse_response

_log = logging.getLogger("chatter_otel.reference")

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from langchain_core.language_models import BaseChatModel

    from chatter_otel.instrumentation.runs import WorkflowRun

__all__ = ["Base", "Conversation", "Message", "MessageRole", "create_app"]

DEFAULT_DB = "sqlite+aiosqlite:///./chatter-app.db"


def new_id() -> str:
    """A 26-character id, the length the host apps use (ULID-sized)."""
    return uuid.uuid4().hex[:26].upper()


class Base(DeclarativeBase):
    pass


class MessageRole(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    user_id: Mapped[str | None] = mapped_column(String(64))
    total_tokens: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    total_cost: Mapped[Decimal] = mapped_column(Numeric(18, 10), default=0, nullable=False)
    message_count: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    role: Mapped[MessageRole] = mapped_column(Enum(MessageRole))  # stored by name: ASSISTANT
    content: Mapped[str] = mapped_column(Text)
    sequence_number: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 10))
    provider_used: Mapped[str | None] = mapped_column(String(64))
    model_used: Mapped[str | None] = mapped_column(String(128))
    finish_reason: Mapped[str | None] = mapped_column(String(64))
    response_time_ms: Mapped[int | None] = mapped_column(Integer)


class ChatIn(BaseModel):
    message: str = Field(min_length=1, max_length=20_000)
    conversation_id: str | None = None
    user_id: str | None = None


def _model_from_env() -> BaseChatModel:
    base_url = os.environ.get("CHATTER_MODEL_BASE_URL")
    if not base_url:
        return LocalChatModel()
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=os.environ.get("CHATTER_MODEL", "gpt-4o-mini"),
        base_url=base_url,
        api_key=SecretStr(os.environ.get("OPENAI_API_KEY", "unused")),
        stream_usage=True,
    )


def _usage_json(run: WorkflowRun) -> dict[str, Any]:
    u = run.usage
    return {
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens, "cost": str(u.cost) if u.cost is not None else None,
        "provider": u.provider, "model": u.model, "llm_calls": u.llm_calls,
        "tool_calls": u.tool_calls, "response_time_ms": u.response_time_ms,
    }  # fmt: skip


def _message_json(m: Message) -> dict[str, Any]:
    return {
        "id": m.id, "role": m.role.name, "content": m.content,
        "sequence_number": m.sequence_number, "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens, "total_tokens": m.total_tokens,
        "cost": str(m.cost) if m.cost is not None else None, "provider_used": m.provider_used,
        "model_used": m.model_used, "finish_reason": m.finish_reason,
        "response_time_ms": m.response_time_ms,
    }  # fmt: skip


class _ChatService:
    """What the routes do: conversations, a workflow run per turn, and the rows it leaves."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], graph: Any) -> None:
        self.sessions = sessions
        self.graph = graph

    async def conversation(self, session: AsyncSession, body: ChatIn) -> Conversation:
        if body.conversation_id:
            conv = await session.get(Conversation, body.conversation_id)
            if conv is None:
                raise HTTPException(404, "no such conversation")
            return conv
        conv = Conversation(user_id=body.user_id, total_tokens=0, total_cost=0, message_count=0)
        session.add(conv)
        await session.flush()
        return conv

    @staticmethod
    async def save_turn(
        session: AsyncSession, conv: Conversation, body: ChatIn, answer: str, run: WorkflowRun,
        *, message_id: str,
    ) -> None:  # fmt: skip
        u = run.usage
        # One atomic UPDATE takes the two sequence numbers and adds the run to the totals: the
        # row lock orders concurrent turns of one conversation (a read-modify-write on the ORM
        # object lost updates and repeated numbers under 50 concurrent chats on PostgreSQL).
        taken = await session.execute(
            update(Conversation)
            .where(Conversation.id == conv.id)
            .values(
                message_count=Conversation.message_count + 2,
                total_tokens=Conversation.total_tokens + (u.total_tokens or 0),
                total_cost=Conversation.total_cost + (u.cost or 0),
            )
            .returning(Conversation.message_count)
            .execution_options(synchronize_session=False)
        )
        seq = int(taken.scalar_one()) - 2
        session.add(Message(conversation_id=conv.id, role=MessageRole.USER, content=body.message,
                            sequence_number=seq + 1))  # fmt: skip
        session.add(
            Message(
                id=message_id,
                conversation_id=conv.id,
                role=MessageRole.ASSISTANT,
                content=answer,
                sequence_number=seq + 2,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
                cost=u.cost,
                provider_used=u.provider,
                model_used=u.model,
                finish_reason=u.finish_reason,
                response_time_ms=u.response_time_ms,
            )
        )
        await session.commit()

    async def chat(self, body: ChatIn) -> dict[str, Any]:
        async with self.sessions() as session:
            conv = await self.conversation(session, body)
            message_id = new_id()
            async with track_workflow(
                "chat", conversation_id=conv.id, message_id=message_id, user_id=body.user_id
            ) as run:
                out = await self.graph.ainvoke({"messages": [HumanMessage(body.message)]})
            answer = str(out["messages"][-1].content)
            await self.save_turn(session, conv, body, answer, run, message_id=message_id)
        return {
            "conversation_id": conv.id, "message_id": message_id, "answer": answer,
            "trace_id": run.trace_id, "usage": _usage_json(run),
        }  # fmt: skip

    async def stream(self, body: ChatIn) -> AsyncIterator[str]:
        async with self.sessions() as session:
            conv = await self.conversation(session, body)
            message_id = new_id()
            parts: list[str] = []
            final: Any = None
            async with track_workflow(
                "chat", conversation_id=conv.id, message_id=message_id, user_id=body.user_id
            ) as run:
                state = {"messages": [HumanMessage(body.message)]}
                async for ev in self.graph.astream_events(state, version="v2"):
                    if ev["event"] == "on_chat_model_stream":
                        text = ev["data"]["chunk"].content
                        if isinstance(text, str) and text:
                            parts.append(text)
                            yield f"event: token\ndata: {json.dumps(text)}\n\n"
                    elif ev["event"] == "on_chain_end" and ev["name"] == "chat":
                        final = ev["data"]["output"]["messages"][-1]
            answer = str(final.content) if isinstance(final, AIMessage) else "".join(parts)
            await self.save_turn(session, conv, body, answer, run, message_id=message_id)
        done = {"conversation_id": conv.id, "message_id": message_id,
                "trace_id": run.trace_id, "usage": _usage_json(run)}  # fmt: skip
        yield f"event: done\ndata: {json.dumps(done)}\n\n"

    async def get(self, conversation_id: str) -> dict[str, Any]:
        async with self.sessions() as session:
            conv = await session.get(Conversation, conversation_id)
            if conv is None:
                raise HTTPException(404, "no such conversation")
            query = (
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.sequence_number)
            )
            messages = [_message_json(m) for m in (await session.execute(query)).scalars()]
        return {
            "id": conv.id, "total_tokens": conv.total_tokens, "total_cost": str(conv.total_cost),
            "message_count": conv.message_count, "messages": messages,
        }  # fmt: skip


def create_app(
    database_url: str | None = None,
    model: BaseChatModel | None = None,
    **configure_options: Any,
) -> FastAPI:
    """The app, with ``configure(app=..., engines=[...], **configure_options)`` already called.

    ``app.state.telemetry`` is the ``Telemetry``; the lifespan creates the tables and shuts
    telemetry down.
    """
    engine = create_async_engine(database_url or os.environ.get("CHATTER_DATABASE_URL", DEFAULT_DB))
    service = _ChatService(
        async_sessionmaker(engine, expire_on_commit=False),
        build_chat_graph(model or _model_from_env()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A database that is down at startup does not stop the app: health answers, chats get
        # 503, and the schema is made as soon as the database answers.
        retry = None if await _ensure_schema(app) else asyncio.create_task(_retry_schema(app))
        bridge = None
        redis_url = os.environ.get("CHATTER_REDIS_URL")
        if redis_url and app.state.telemetry.events is not None:
            # Several app workers: one event stream, so /events shows every worker's runs.
            from chatter_otel.sinks.redis import RedisEventBridge

            bridge = RedisEventBridge(app.state.telemetry.events, redis_url)
            await bridge.start()
        yield
        if retry is not None:
            retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retry
        if bridge is not None:
            await bridge.close()
        app.state.telemetry.shutdown()
        await engine.dispose()

    app = FastAPI(title="chatter-otel reference app", lifespan=lifespan)
    app.state.engine = engine
    app.state.schema_ready = False
    configure_options.setdefault("service_name", "chatter-reference-app")
    configure_options.setdefault("prices", LOCAL_MODEL_PRICES)
    app.state.telemetry = configure(app=app, engines=[engine], **configure_options)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/chat")
    async def chat(body: ChatIn) -> dict[str, Any]:
        await _need_database(app)
        return await service.chat(body)

    @app.post("/chat/stream")
    async def chat_stream(body: ChatIn) -> StreamingResponse:
        await _need_database(app)
        return StreamingResponse(service.stream(body), media_type="text/event-stream")

    @app.get("/events")
    async def events(conversation_id: str | None = None, user_id: str | None = None) -> Any:
        bus = app.state.telemetry.events
        if bus is None:
            raise HTTPException(404, "events are switched off")
        return sse_response(bus, conversation_id=conversation_id, user_id=user_id)

    @app.get("/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str) -> dict[str, Any]:
        return await service.get(conversation_id)

    return app


_SCHEMA_RETRY_S = 2.0


async def _ensure_schema(app: FastAPI) -> bool:
    """The tables, made once the database answers; False (said once a minute) while it does
    not."""
    if app.state.schema_ready:
        return True
    try:
        await asyncio.wait_for(create_tables(app), timeout=10)
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        warn_once("reference:db", "reference app: the database is unavailable (%s: %.200s); "
                  "chats answer 503 until it is back", type(exc).__name__, exc)  # fmt: skip
        return False
    if not app.state.schema_ready:
        app.state.schema_ready = True
        _log.info("reference app: the database answers; tables ready")
    return True


async def _retry_schema(app: FastAPI) -> None:
    while not await _ensure_schema(app):
        await asyncio.sleep(_SCHEMA_RETRY_S)


async def _need_database(app: FastAPI) -> None:
    if not await _ensure_schema(app):
        raise HTTPException(503, "the database is unavailable; the chat was not run, try again "
                                 "shortly")  # fmt: skip


async def create_tables(app: FastAPI) -> None:
    async with app.state.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
