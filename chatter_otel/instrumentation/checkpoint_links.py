"""Pauses linked to their resumes across processes, through the run's own checkpoint.

In one process a resume finds its pause in the registry of ``pauses``. Behind several workers
the resume usually lands on another one; what every worker shares is the thread's checkpoints.
So every checkpoint a graph run on a thread writes carries, in its metadata, the W3C
``traceparent`` of the run's workflow span (key ``chatter.run.traceparent``, about 60 bytes, in
the write LangGraph makes anyway: no extra I/O, and nothing for runs without a checkpointer).
A run that resumes (``Command(resume=...)``, or ``None`` as input) and that this process did
not see pause reads it from the checkpoint LangGraph loads for it, and its workflow span gets
the link then, with ``langgraph.thread.id``/``langgraph.checkpoint.id`` and the
``gen_ai.agent.resumed`` event. A link added after the span started is not seen by a sampler
(the in-process one is): a resumed run's trace is kept or dropped on its own.

Hooks (LangGraph's private loop, so optional like the other private hooks): the loop's
``_put_checkpoint`` (stamp) and ``SyncPregelLoop.__enter__`` / ``AsyncPregelLoop.__aenter__``
(read), for the root graph only (its checkpoint namespace is empty). A stamp that is not a
valid traceparent (a hand-edited or hostile checkpoint) is ignored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanContext, TraceFlags

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel.instrumentation.active import active_handler

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from chatter_otel.instrumentation.invocations import WorkflowInvocation

__all__ = ["STAMP_KEY", "RunningThreads", "install", "parse_traceparent", "remove"]

STAMP_KEY = "chatter.run.traceparent"
_CONF = "configurable"


def traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: Any) -> SpanContext | None:
    """A remote span context from a stamp; None for anything but a valid version-00 one."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    version, trace_id, span_id, flags = [*value.split("-"), "", "", ""][:4]
    if version != "00" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    try:
        tid, sid, fl = int(trace_id, 16), int(span_id, 16), int(flags, 16)
    except ValueError:
        return None
    if not tid or not sid or value != value.lower():
        return None
    return SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(fl))


class RunningThreads:
    """The app's graph runs open now, by ``thread_id`` (LangGraph runs one at a time per
    thread); bounded like every registry of ours."""

    def __init__(self, max_threads: int) -> None:
        self._max = max_threads
        self._runs: OrderedDict[str, WorkflowInvocation] = OrderedDict()
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")

    def __len__(self) -> int:
        return len(self._runs)

    def started(self, thread: str, inv: WorkflowInvocation) -> None:
        with self._lock:
            self._runs[thread] = inv
            while len(self._runs) > self._max:
                self._runs.popitem(last=False)

    def ended(self, inv: WorkflowInvocation) -> None:
        thread = inv.thread_id
        if thread is not None:
            with self._lock:
                if self._runs.get(thread) is inv:
                    del self._runs[thread]

    def get(self, thread: Any) -> WorkflowInvocation | None:
        return self._runs.get(thread) if isinstance(thread, str) else None


def _root_thread(loop: Any) -> Any:
    conf = loop.config.get(_CONF) or {}
    return None if conf.get("checkpoint_ns") else conf.get("thread_id")


def _stamp(wrapped: Callable[..., Any], loop: Any, args: Any, kwargs: Any) -> Any:
    if not loop.checkpointer:  # nothing is written: every step of a graph without one
        return wrapped(*args, **kwargs)
    metadata = args[0] if args else kwargs.get("metadata")
    handler = active_handler()
    # A fresh dict is a new checkpoint's (the exit call passes the current one back).
    if (
        handler is not None
        and isinstance(metadata, dict)
        and metadata is not loop.checkpoint_metadata
    ):
        inv = handler.threads.get(_root_thread(loop))
        if inv is not None and inv.span_id:
            metadata[STAMP_KEY] = inv.stamp
    return wrapped(*args, **kwargs)


def _loaded(loop: Any) -> None:
    handler = active_handler()
    if handler is None or not loop.checkpointer or not handler.threads:
        return
    inv = handler.threads.get(_root_thread(loop))
    if inv is None or not inv.awaits_link:
        return
    metadata: Mapping[str, Any] = loop.checkpoint_metadata or {}
    paused = parse_traceparent(metadata.get(STAMP_KEY))
    if paused is not None and paused.span_id != inv.span.get_span_context().span_id:
        checkpoint = (loop.checkpoint or {}).get("id")
        inv.link_pause(paused, checkpoint if isinstance(checkpoint, str) else None)


def _enter(wrapped: Callable[..., Any], loop: Any, args: Any, kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    _loaded(loop)
    return result


async def _aenter(wrapped: Callable[..., Any], loop: Any, args: Any, kwargs: Any) -> Any:
    result = await wrapped(*args, **kwargs)
    _loaded(loop)
    return result


def _targets() -> list[tuple[Any, str, Callable[..., Any]]]:
    try:
        from langgraph.pregel._loop import AsyncPregelLoop, PregelLoop, SyncPregelLoop
    except ImportError:  # pragma: no cover - a LangGraph that moved its loop
        return []
    targets = [(PregelLoop, "_put_checkpoint", _stamp), (SyncPregelLoop, "__enter__", _enter),
               (AsyncPregelLoop, "__aenter__", _aenter)]  # fmt: skip
    return [t for t in targets if hasattr(t[0], t[1])]


def install() -> None:
    from wrapt import wrap_function_wrapper

    for cls, name, wrapper in _targets():
        wrap_function_wrapper(cls, name, wrapper)


def remove() -> None:
    from opentelemetry.instrumentation.utils import unwrap

    for cls, name, _ in _targets():
        if hasattr(getattr(cls, name), "__wrapped__"):
            unwrap(cls, name)
