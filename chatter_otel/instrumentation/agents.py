"""Which runs are agents, and the agent attributes their spans and the spans below them carry.

An agent is, for the GenAI conventions, an ``invoke_agent {agent name}`` span. A run is one when:

* its graph was built by a prebuilt agent factory: LangChain's ``create_agent`` or LangGraph's
  ``create_react_agent``. Recognised by the graph itself (a node whose function those factories
  define), once per compiled graph, not by the metadata LangChain copies into every child run;
* or the app marks it with metadata: ``{"gen_ai.agent.name": "planner"}`` (optionally
  ``gen_ai.agent.id`` and ``gen_ai.agent.description``) on a graph (``with_config`` or the
  invoke config) or on a node (``add_node(..., metadata=...)``).

LangChain hands a run's metadata down to every run below it, so a mark is an agent's own only
where it appears first: a run whose enclosing agent has the same name inherited it. (A nested
agent reusing its parent's name is therefore not a new agent; give it its own name.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_AGENT_DESCRIPTION,
    GEN_AI_AGENT_ID,
    GEN_AI_AGENT_NAME,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from chatter_otel.instrumentation.semconv_modes import SemconvMode

__all__ = ["Agent", "agent_for_graph", "agent_for_node"]

_MAX_LEN = 256
# The factories whose graphs are agents: (module, qualname prefix) of a node function they make.
_FACTORIES = (
    ("langchain.agents.factory", "create_agent."),
    ("langgraph.prebuilt.chat_agent_executor", "create_react_agent."),
)
# Per compiled graph, whether a factory built it. Weak keys: graphs an app drops leave with it.
_built_by_factory: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    id: str | None = None
    description: str | None = None

    def attributes(self, mode: SemconvMode) -> dict[str, str]:
        """On the agent's own span: what the spans below carry, and the description."""
        attrs = self.child_attributes(mode)
        if self.description is not None:
            attrs[GEN_AI_AGENT_DESCRIPTION] = self.description
        return attrs

    def child_attributes(self, mode: SemconvMode) -> dict[str, str]:
        """On the LLM, tool and retrieval spans below it: which agent made the call."""
        attrs = {GEN_AI_AGENT_NAME: self.name}
        if self.id is not None and mode.agent_id_on_internal:
            attrs[GEN_AI_AGENT_ID] = self.id
        return attrs


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()[:_MAX_LEN]
    return None


def _marked(metadata: Mapping[str, Any] | None, enclosing: Agent | None) -> Agent | None:
    if not metadata:
        return None
    name = _text(metadata.get(GEN_AI_AGENT_NAME))
    if name is None or (enclosing is not None and enclosing.name == name):
        return None  # unmarked, or the enclosing agent's mark handed down
    return Agent(name, _text(metadata.get(GEN_AI_AGENT_ID)),
                 _text(metadata.get(GEN_AI_AGENT_DESCRIPTION)))  # fmt: skip


def built_by_factory(graph: Any) -> bool:
    """Whether a prebuilt agent factory compiled ``graph`` (looked at once per graph)."""
    try:
        return _built_by_factory[graph]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: look every time (cheap, and never wrong)
        return _looks_built(graph)
    found = _looks_built(graph)
    _built_by_factory[graph] = found
    return found


def _looks_built(graph: Any) -> bool:
    nodes = getattr(graph, "nodes", None)
    if not isinstance(nodes, dict):
        return False
    for node in nodes.values():
        bound = getattr(node, "bound", None)
        func = getattr(bound, "func", None) or getattr(bound, "afunc", None)
        module = getattr(func, "__module__", None)
        qualname = getattr(func, "__qualname__", "") or ""
        if any(module == m and qualname.startswith(q) for m, q in _FACTORIES):
            return True
    return False


def agent_for_graph(
    name: str, prebuilt: bool, metadata: Mapping[str, Any] | None, enclosing: Agent | None
) -> Agent | None:
    """The agent a graph run is, if any: the app's mark first, else a factory-built graph
    (named as its run is)."""
    marked = _marked(metadata, enclosing)
    if marked is not None:
        return marked
    if prebuilt:
        return Agent(name[:_MAX_LEN])
    return None


def agent_for_node(metadata: Mapping[str, Any] | None, enclosing: Agent | None) -> Agent | None:
    """The agent a node run is, if the app marked it."""
    return _marked(metadata, enclosing)
