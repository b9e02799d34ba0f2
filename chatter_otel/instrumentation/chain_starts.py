"""What a chain start becomes: a workflow, an agent, or a node span (else an alias).

The callback handler sees every chain start; this decides, from what the instrumentor announced
(graph runs, and whether an agent factory built the graph), the run's metadata (agent marks,
``thread_id``) and its input (``Command(resume=...)``), which invocation the run gets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langgraph.types import Command
from opentelemetry import trace

from chatter_otel.attributes import LANGGRAPH_NODE_NAME, LANGGRAPH_STEP
from chatter_otel.instrumentation.agents import agent_for_graph, agent_for_node
from chatter_otel.instrumentation.ids import ambient_ids
from chatter_otel.instrumentation.invocations import (
    Invocation,
    NodeInvocation,
    WorkflowInvocation,
)
from chatter_otel.instrumentation.pauses import Pause, Pauses, asked_checkpoint, thread_of
from chatter_otel.instrumentation.runs import RunIds, RunSlot, current_workflow

if TYPE_CHECKING:
    from collections.abc import Mapping
    from uuid import UUID

    from opentelemetry.trace import Tracer

    from chatter_otel.instrumentation.checkpoint_links import RunningThreads
    from chatter_otel.instrumentation.settings import Settings

__all__ = ["Announced", "ChainStarts"]

# An announced graph run: name, ids, last_run() slot, built by an agent factory.
Announced = tuple[str, RunIds, RunSlot, bool]


def _step(metadata: Mapping[str, Any]) -> int | None:
    step = metadata.get("langgraph_step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class ChainStarts:
    __slots__ = ("pauses", "settings", "threads", "tracer")

    def __init__(self, tracer: Tracer, settings: Settings, pauses: Pauses,
                 threads: RunningThreads) -> None:  # fmt: skip
        self.tracer, self.settings, self.pauses = tracer, settings, pauses
        self.threads = threads

    def graph(  # noqa: PLR0917 - one call site
        self, run_id: UUID, graph: Announced, node_name: str | None, parent: Invocation | None,
        inputs: Any, metadata: Mapping[str, Any] | None,
    ) -> WorkflowInvocation:  # fmt: skip
        name, ids, slot, prebuilt = graph
        node = None
        if node_name is not None:  # a compiled subgraph added as a node: node, then workflow
            assert parent is not None and metadata is not None
            node = self._plain_node(run_id, node_name, parent, metadata)
        under = node or parent
        thread = resumes = None
        awaits = False
        if under is not None:
            outer = under.workflow
            ids = ids.merged_over(under.ids)
        else:  # the app's own call: where a pause is recorded and a resume linked
            outer = current_workflow.get()
            ids = ambient_ids(ids)
            thread = thread_of(metadata)
            if thread is not None:
                resumes = self._resumes(thread, inputs, metadata)
                # paused where this process did not see it: the checkpoint says where
                awaits = (resumes is None and inputs is None) or (
                    resumes is not None and not resumes.context.is_valid
                )
        agent = agent_for_graph(name, prebuilt, metadata, under.agent if under else None)
        inv = WorkflowInvocation(
            run_id, name, ids, self.tracer, self.settings, parent=under, outer=outer, node=node,
            agent=agent, thread_id=thread, resumes=resumes, awaits_link=awaits,
        )  # fmt: skip
        inv.slot = slot
        if thread is not None:
            self.threads.started(thread, inv)
        return inv

    def _resumes(
        self, thread: str, inputs: Any, metadata: Mapping[str, Any] | None
    ) -> Pause | None:
        """The pause a graph run resumes: ``Command(resume=...)``, or ``None`` as input (go on
        from the checkpoint) on a thread this process saw pause. New input starts over: no
        resume."""
        is_resume = isinstance(inputs, Command) and inputs.resume is not None
        if not is_resume and inputs is not None:
            return None
        asked = asked_checkpoint(metadata)
        pause = self.pauses.resuming(thread, asked)
        if pause is None and is_resume:  # paused in another process: no link, still joinable
            return Pause(trace.INVALID_SPAN_CONTEXT, thread, asked, (), 0.0)
        return pause

    def node(
        self, run_id: UUID, name: str, parent: Invocation, metadata: Mapping[str, Any]
    ) -> Invocation:
        agent = agent_for_node(metadata, parent.agent)
        if agent is None:
            return self._plain_node(run_id, name, parent, metadata)
        # A node the app marked as an agent: its one span is the agent's, with the node's keys.
        extra: dict[str, Any] = {LANGGRAPH_NODE_NAME: name}
        step = _step(metadata)
        if step is not None:
            extra[LANGGRAPH_STEP] = step
        return WorkflowInvocation(
            run_id, name, parent.ids, self.tracer, self.settings, parent=parent,
            outer=parent.workflow, agent=agent, graph=False, extra=extra,
        )  # fmt: skip

    def _plain_node(
        self, run_id: UUID, name: str, parent: Invocation, metadata: Mapping[str, Any]
    ) -> NodeInvocation:
        return NodeInvocation(run_id, parent, name, _step(metadata), self.tracer)
