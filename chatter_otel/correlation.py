"""Correlation ids: from the request header to baggage, every span, the logs and the response.

``CorrelationMiddleware`` (plain ASGI: FastAPI, Starlette, any ASGI app) takes the request's
``X-Correlation-ID`` when it is valid (1-128 characters of ``[A-Za-z0-9._:-]``), else one already
in W3C baggage, else one from the app's own source (``getter`` or ``context_var``), else a new
one. When the app keeps its own id (a ``getter`` or ``context_var``) and the request brought no
header, the app is handed the id as the request's ``X-Correlation-ID``, as a gateway would: its
own middleware adopts it, so the request has one id from its first byte (a body read before the
app's middleware runs included). Anything invalid
(CRLF, non-ASCII, over-long, empty) is replaced and logged (rate-limited; the value itself is never
logged raw). The id is put into baggage as ``chatter.correlation.id`` (so ``BaggageSpanProcessor``
stamps it on every span started later, and propagators carry it to outbound HTTP calls), into a
context variable (``current_correlation_id()``, and the app's own ``context_var`` if given), onto
the current server span, and into the response's ``X-Correlation-ID`` and ``traceresponse``
headers. It composes with the FastAPI/ASGI OpenTelemetry instrumentation: that one makes the
server span, this one only adds to it.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, context, trace
from opentelemetry.processor.baggage import BaggageSpanProcessor

from chatter_otel._safety import warn_once
from chatter_otel.app_loop import note_app_loop
from chatter_otel.attributes import CHATTER_CORRELATION_ID

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = [
    "CORRELATION_ID_PATTERN",
    "HEADER",
    "CorrelationLogFilter",
    "CorrelationMiddleware",
    "ValidatingBaggageSpanProcessor",
    "current_correlation_id",
    "is_valid_app_id",
    "is_valid_correlation_id",
    "valid_correlation_id",
]

HEADER = "X-Correlation-ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
# The one character set of a correlation id, wherever it enters (header, baggage, the app's
# variable or getter, a graph's config, track_workflow, events from Redis): letters, digits and
# ``. _ : -``, 1 to 128 of them. UUIDs, ULIDs, "req-7", "svc:42.a" pass; spaces, slashes,
# ``@ + =``, quotes, markup, CR/LF, control and bidi characters never do: the id is echoed in
# headers, written in log lines and shown in UIs.
CORRELATION_ID_PATTERN = "[A-Za-z0-9._:-]{1,128}"
_VALID = re.compile(CORRELATION_ID_PATTERN, re.ASCII)
_correlation: ContextVar[str | None] = ContextVar("chatter_otel_correlation_id", default=None)


def is_valid_correlation_id(value: object) -> bool:
    """The one validator for a correlation id, wherever one enters (header, W3C baggage, the
    app's variable or getter, a graph's config, ``track_workflow``): 1-128 of
    ``[A-Za-z0-9._:-]``. No CR/LF, markup, spaces or separators: the id is echoed in headers,
    written in log lines and shown in UIs."""
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


# Conversation, message and user ids: the app's own, so wider than a correlation id, but never
# whitespace, quotes, angle brackets, backslashes, control or bidi characters (nothing that is
# not printable), and at most 256 characters.
_APP_ID = re.compile(r"[^\s<>\"'`\\]{1,256}")


def is_valid_app_id(value: object) -> bool:
    """The one validator for the app's conversation, message and user ids (spans, events,
    Redis, the ledger)."""
    return isinstance(value, str) and value.isprintable() and _APP_ID.fullmatch(value) is not None


def valid_correlation_id(value: object, source: str) -> str | None:
    """``value`` if it is a valid correlation id, else None, with one rate-limited log line
    naming where it came from and its length (never the value: it may be hostile)."""
    if value is None:
        return None
    if isinstance(value, str) and is_valid_correlation_id(value):
        return value
    size = len(value) if isinstance(value, str | bytes) else -1
    warn_once(f"correlation:invalid:{source}", "chatter-otel: ignored an invalid correlation id "
              "from %s (%d chars; allowed: 1-128 of [A-Za-z0-9._:-])", source, size)  # fmt: skip
    return None


class ValidatingBaggageSpanProcessor(BaggageSpanProcessor):
    """The contrib ``BaggageSpanProcessor`` for ``chatter.correlation.id``, copying it onto a
    span only when it is a valid id: without our middleware (zero-code apps) baggage comes
    straight from the request's ``baggage`` header."""

    def __init__(self) -> None:
        super().__init__(lambda key: key == CHATTER_CORRELATION_ID)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        attributes = getattr(span, "attributes", None) or {}
        if CHATTER_CORRELATION_ID in attributes:
            return  # set by whoever started it (ours: from the run's ids); theirs stands
        # The request's id: the app's own when it keeps one, else ours, else a valid one from
        # the request's baggage.
        value = current_correlation_id() or valid_correlation_id(
            baggage.get_baggage(CHATTER_CORRELATION_ID, parent_context), "baggage"
        )
        if value is not None:
            span.set_attribute(CHATTER_CORRELATION_ID, value)


_app_sources: list[Callable[[], Any]] = []  # the app's own getter / ContextVar.get, if given


def unregister_app_sources() -> None:
    """Forget the app's id sources (``Telemetry.shutdown``)."""
    _app_sources.clear()


def register_app_sources(*sources: Callable[[], Any] | None) -> None:
    """The app keeps its own correlation id (its middleware, ContextVar or getter): that id is
    the request's id everywhere. Read when needed, so an id the app makes after ours (its
    middleware runs inside ours) still wins. One app per process: the last middleware made
    says which sources (a new app replaces them)."""
    _app_sources[:] = [s for s in sources if s is not None]


# The request's id as last seen, shared (a mutable holder) by every task of the request: an id
# the app made and dropped again (its middleware resets its ContextVar before the response, or
# on an exception) is still the id the response carries.
_request: ContextVar[list[str] | None] = ContextVar("chatter_otel_request", default=None)


def _from_app() -> str | None:
    for source in _app_sources:
        try:
            value = source()
        except Exception:
            warn_once("correlation:source", "chatter-otel: the app's correlation id source "
                      "raised", exc_info=True)  # fmt: skip
            continue
        if value is not None:
            cid = valid_correlation_id(value, "the app's correlation id")
            holder = _request.get()
            # [the request's id, the id we made]: ours, set in the app's variable for an app
            # that makes none, must not overwrite one the app made.
            if cid is not None and holder is not None and cid != holder[1]:
                holder[0] = cid
            return cid
    return None


def current_correlation_id() -> str | None:
    """The correlation id of the current request: the app's own (when it keeps one), else the
    middleware's, else the running workflow's (``track_workflow(correlation_id=...)``), else one
    in baggage."""
    cid = _from_app() if _app_sources else None
    holder = _request.get()
    if holder is not None:  # inside a request: its id, the app's own if it made one
        return holder[0]
    if cid is None:
        cid = _correlation.get()
    if cid is None:
        from chatter_otel.instrumentation.runs import current_workflow

        run = current_workflow.get()
        cid = run.correlation_id if run is not None else None
    if cid is None:
        found = baggage.get_baggage(CHATTER_CORRELATION_ID)
        cid = found if isinstance(found, str) and is_valid_correlation_id(found) else None
    return cid


def _new_id() -> str:
    return uuid.uuid4().hex


class CorrelationMiddleware:
    """ASGI middleware; see the module docstring. ``app.add_middleware(CorrelationMiddleware)``.

    ``getter``: a callable returning the app's own correlation id (or None), consulted when the
    request brings none. ``context_var``: an app ``ContextVar``, read the same way (after the
    getter) when the request brings no id, and set to the id for the request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        getter: Callable[[], str | None] | None = None,
        context_var: ContextVar[Any] | None = None,
    ) -> None:
        self.app = app
        self.getter = getter
        self.context_var = context_var
        register_app_sources(getter, context_var.get if context_var is not None else None)

    def _resolve(self, scope: Scope, own: str | None) -> str:
        # The app's own id first, when one is set already (its middleware outside ours).
        if own is not None:
            return own
        raw = next((v for k, v in scope.get("headers") or () if k.lower() == _HEADER_KEY), None)
        if raw is not None:
            value = str(raw.decode("latin-1"))
            if is_valid_correlation_id(value):
                return value
            warn_once(
                "correlation:invalid",
                "chatter-otel: replaced an invalid %s header (%d bytes; allowed: 1-128 of "
                "[A-Za-z0-9._:-])",
                HEADER,
                len(raw),
            )
            return _new_id()
        from_baggage = baggage.get_baggage(CHATTER_CORRELATION_ID)
        if is_valid_correlation_id(from_baggage):
            return str(from_baggage)
        return _new_id()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        own = _from_app() if _app_sources else None
        cid = self._resolve(scope, own)
        headers = scope.get("headers") or ()
        if _app_sources and own is None and not any(k.lower() == _HEADER_KEY for k, _ in headers):
            # The app keeps its own id and the request brought none: hand it ours as the
            # request's header, the way a gateway does, so its middleware adopts it rather than
            # making a second one after spans (a body read, say) already carried ours.
            scope = {**scope, "headers": [*headers, (_HEADER_KEY, cid.encode("latin-1"))]}
        holder = [cid, cid]
        note_app_loop()  # the app's loop, for an async emit the events are forwarded to
        span = trace.get_current_span()  # the server span of the ASGI instrumentation, if any
        if span.is_recording():
            span.set_attribute(CHATTER_CORRELATION_ID, cid)
        span_ctx = span.get_span_context()
        extra = [(_HEADER_KEY, cid.encode("latin-1"))]
        if span_ctx.is_valid and not _outer_middleware_answers_traceresponse(span):
            flags = int(span_ctx.trace_flags)
            value = f"00-{span_ctx.trace_id:032x}-{span_ctx.span_id:016x}-{flags:02x}"
            extra.append((b"traceresponse", value.encode("latin-1")))

        async def send_with_headers(message: Message) -> None:
            if message.get("type") == "http.response.start":
                # The app's middleware (inside ours) may have made the request's id since: the
                # id it answers with (or still keeps) is the id of the response, of the server
                # span and of what starts from here on.
                headers = list(message.get("headers") or ())
                answered = next((v.decode("latin-1") for k, v in headers
                                 if k.lower() == _HEADER_KEY), None)  # fmt: skip
                if _app_sources:
                    _from_app()  # what the app keeps now, if anything, into the holder
                final = valid_correlation_id(answered, "the app's response") or holder[0]
                holder[0] = final  # what starts from here on (the send spans) carries it
                if final != cid:
                    extra[0] = (_HEADER_KEY, final.encode("latin-1"))
                    _correlation.set(final)
                    if span.is_recording():
                        span.set_attribute(CHATTER_CORRELATION_ID, final)
                present = {k.lower() for k, _ in headers}
                headers.extend((k, v) for k, v in extra if k not in present)
                message["headers"] = headers
            await send(message)

        token = context.attach(baggage.set_baggage(CHATTER_CORRELATION_ID, cid))
        cid_token = _correlation.set(cid)
        request_token = _request.set(holder)
        app_token = self.context_var.set(cid) if self.context_var is not None else None
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if app_token is not None and self.context_var is not None:
                self.context_var.reset(app_token)
            _correlation.reset(cid_token)
            _request.reset(request_token)
            context.detach(token)


def _outer_middleware_answers_traceresponse(span: Span) -> bool:
    """The ASGI instrumentation's middleware is outside ours (the current span is its server
    span) and a response propagator is set: it adds ``traceresponse`` itself (and
    ``Access-Control-Expose-Headers``), so ours would be a second one."""
    scope = getattr(span, "instrumentation_scope", None)
    if scope is None or not str(scope.name).startswith("opentelemetry.instrumentation."):
        return False
    from opentelemetry.instrumentation.propagators import get_global_response_propagator

    return get_global_response_propagator() is not None  # type: ignore[no-untyped-call]


def inject_log_ids(record: logging.LogRecord) -> None:
    """Add ``trace_id``, ``span_id`` and ``correlation_id`` to a log record ("" when none)."""
    span = trace.get_current_span()
    ctx = span.get_span_context()
    record.trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else ""
    record.span_id = f"{ctx.span_id:016x}" if ctx.is_valid else ""
    # Inside a run, the run's id, as its spans carry it (a graph's config may name one:
    # ``metadata={"correlation_id": ...}``); else the request's.
    cid = None
    scope = getattr(span, "instrumentation_scope", None)
    if scope is not None and scope.name == "chatter_otel":
        cid = (getattr(span, "attributes", None) or {}).get(CHATTER_CORRELATION_ID)
    record.correlation_id = cid if isinstance(cid, str) else current_correlation_id() or ""


class CorrelationLogFilter(logging.Filter):
    """A logging filter adding ``trace_id``, ``span_id`` and ``correlation_id`` to records.

    Put it on a handler (or use ``configure(log_correlation=True)``, which covers every logger),
    then use ``%(correlation_id)s`` and friends in the format.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        inject_log_ids(record)
        return True


_factory_installed = False


def install_log_record_factory() -> None:
    """Make every log record carry the ids, whatever logger or handler it goes through."""
    global _factory_installed  # noqa: PLW0603 - the record factory is process-wide
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        inject_log_ids(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True
