"""Interrupt and resume: the run an interrupt paused, and the link from the run resuming it.

A node that calls ``interrupt()`` ends the graph run with its state saved at a checkpoint; the
app resumes later with ``Command(resume=...)`` on the same ``thread_id``. That is a new trace.
To stitch the two:

* the paused run's workflow span gets a ``gen_ai.agent.paused`` event and ``chatter.interrupted``;
  the pause is remembered here by ``thread_id`` (with the checkpoint id and interrupt ids);
* the resuming run's workflow span starts with a span link to the paused span (samplers see it)
  and a ``gen_ai.agent.resumed`` event.

Both events, and both spans, carry ``langgraph.thread.id`` and ``langgraph.checkpoint.id``.
This registry is per process; a resume in another process (or after the registry let go of
the pause) is linked through the checkpoint instead (``checkpoint_links``). Bounded:
``max_runs`` threads, least recently paused dropped first, and entries older than
``max_run_age_s`` ignored.

Static breakpoints (``interrupt_before``/``interrupt_after``) raise into no LangChain callback;
LangGraph's ``GraphCallbackHandler.on_interrupt`` reports them (``hooks._GraphLifecycle``) and
they pause the run the same way. A run started with ``None`` (go on from the checkpoint) on a
thread this process saw pause is linked like a ``Command(resume=...)``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Link

from chatter_otel._forksafe import fresh_after_fork
from chatter_otel.attributes import (
    LANGGRAPH_CHECKPOINT_ID,
    LANGGRAPH_INTERRUPT_IDS,
    LANGGRAPH_THREAD_ID,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from opentelemetry.trace import SpanContext

__all__ = [
    "PAUSED_EVENT",
    "RESUMED_EVENT",
    "Pause",
    "Pauses",
    "asked_checkpoint",
    "checkpoint_of",
    "interrupt_ids",
    "thread_of",
]

PAUSED_EVENT = "gen_ai.agent.paused"
RESUMED_EVENT = "gen_ai.agent.resumed"
_MAX_ID_LEN = 256
_MAX_INTERRUPTS = 32


@dataclass(frozen=True, slots=True)
class Pause:
    context: SpanContext  # the paused workflow span
    thread_id: str
    checkpoint_id: str | None
    interrupt_ids: tuple[str, ...]
    at: float  # time.monotonic()

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {LANGGRAPH_THREAD_ID: self.thread_id}
        if self.checkpoint_id is not None:
            attrs[LANGGRAPH_CHECKPOINT_ID] = self.checkpoint_id
        if self.interrupt_ids:
            attrs[LANGGRAPH_INTERRUPT_IDS] = list(self.interrupt_ids)
        return attrs

    def link(self) -> Link:
        return Link(self.context, self.attributes())


class Pauses:
    """Paused runs by thread id; bounded in count and age."""

    def __init__(self, max_threads: int, max_age_s: float) -> None:
        self._max, self._max_age = max_threads, max_age_s
        self._by_thread: OrderedDict[str, Pause] = OrderedDict()
        self._lock = threading.Lock()
        fresh_after_fork(self, "_lock")

    def __len__(self) -> int:
        return len(self._by_thread)

    def paused(self, pause: Pause) -> None:
        with self._lock:
            by_thread = self._by_thread
            by_thread.pop(pause.thread_id, None)
            by_thread[pause.thread_id] = pause
            while len(by_thread) > self._max:
                by_thread.popitem(last=False)

    def resuming(self, thread_id: str, checkpoint_id: str | None) -> Pause | None:
        """The pause a run on ``thread_id`` resumes, if this process saw it. A run started
        from an explicit checkpoint resumes that pause only."""
        with self._lock:
            pause = self._by_thread.get(thread_id)
            if pause is None:
                return None
            if time.monotonic() - pause.at > self._max_age:
                del self._by_thread[thread_id]
                return None
        if checkpoint_id is not None and checkpoint_id != pause.checkpoint_id:
            return None
        return pause


def _id(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        return text[:_MAX_ID_LEN] if text else None
    return None


def thread_of(metadata: Mapping[str, Any] | None) -> str | None:
    """The run's ``thread_id`` (LangChain copies ``configurable`` scalars into metadata)."""
    return _id(metadata.get("thread_id")) if metadata else None


def asked_checkpoint(metadata: Mapping[str, Any] | None) -> str | None:
    """The checkpoint a run was explicitly started from (``configurable.checkpoint_id``)."""
    return _id(metadata.get("checkpoint_id")) if metadata else None


def checkpoint_of(configurable: Mapping[str, Any] | None) -> str | None:
    """The checkpoint a node's task runs from: the root namespace's entry of LangGraph's
    ``checkpoint_map`` (the one a resume continues from), else an explicit ``checkpoint_id``."""
    if not configurable:
        return None
    cmap = configurable.get("checkpoint_map")
    if isinstance(cmap, dict):
        root = _id(cmap.get(""))
        if root is not None:
            return root
    return _id(configurable.get("checkpoint_id"))


def interrupt_ids(error: BaseException) -> tuple[str, ...]:
    """The ids of the ``Interrupt`` objects a ``GraphInterrupt`` carries."""
    found: list[str] = []
    for arg in error.args[:1]:
        if isinstance(arg, list | tuple):
            for item in arg[:_MAX_INTERRUPTS]:
                ident = _id(getattr(item, "id", None))
                if ident is not None:
                    found.append(ident)
    return tuple(found)
