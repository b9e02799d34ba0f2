"""Which version of the GenAI conventions the spans speak: ``OTEL_SEMCONV_STABILITY_OPT_IN``.

The OpenTelemetry transition plan for the GenAI conventions: an instrumentation keeps the names
it emits by default, and switches to the newest the conventions define when the comma-separated
``OTEL_SEMCONV_STABILITY_OPT_IN`` holds ``gen_ai_latest_experimental``. We also accept
``gen_ai_latest_experimental/dup`` (the ``http/dup`` and ``database/dup`` pattern of the other
signals) to emit both at once, for a backend moving its queries from one to the other.

* ``default``: semantic conventions v1.41 names (the contract this package documents).
* ``gen_ai_latest_experimental``: the GenAI conventions' own first release (v0.1.0, the names
  moved to their own repository): a workflow span names its workflow with ``gen_ai.agent.name``
  instead of ``gen_ai.workflow.name`` (``gen_ai.operation.name`` stays ``invoke_workflow``), and
  in-process (INTERNAL) agent spans carry no ``gen_ai.agent.id``.
* ``gen_ai_latest_experimental/dup``: both names on workflow spans, and the agent id kept.

Only span attributes differ: every record the processors read (and so the ledger, monitoring,
events and metrics) is the same in every mode.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_AGENT_NAME,
    GEN_AI_WORKFLOW_NAME,
)

__all__ = ["DEFAULT", "DUAL", "ENV_SEMCONV_OPT_IN", "LATEST", "SemconvMode", "resolve_mode"]

ENV_SEMCONV_OPT_IN: Final = "OTEL_SEMCONV_STABILITY_OPT_IN"
DEFAULT: Final = "default"
LATEST: Final = "gen_ai_latest_experimental"
DUAL: Final = "gen_ai_latest_experimental/dup"
_MODES = (DEFAULT, LATEST, DUAL)

_log = logging.getLogger("chatter_otel")


class SemconvMode:
    """The resolved mode, with the few naming decisions that depend on it."""

    __slots__ = ("agent_id_on_internal", "name", "workflow_name_keys")

    def __init__(self, name: str) -> None:
        self.name = name
        keys: tuple[str, ...]
        if name == LATEST:
            keys = (GEN_AI_AGENT_NAME,)
        elif name == DUAL:
            keys = (GEN_AI_WORKFLOW_NAME, GEN_AI_AGENT_NAME)
        else:
            keys = (GEN_AI_WORKFLOW_NAME,)
        self.workflow_name_keys = keys
        # v0.1.0 removed gen_ai.agent.id from internal agent spans (an in-process agent has no
        # id a provider issued); v1.41 asks for it when known.
        self.agent_id_on_internal = name != LATEST

    def __repr__(self) -> str:
        return f"SemconvMode({self.name!r})"


def resolve_mode(kwarg: str | None = None) -> SemconvMode:
    """kwarg (one of the three values) > ``OTEL_SEMCONV_STABILITY_OPT_IN`` > ``default``.

    The variable is a list shared with the other signals (``http``, ``database/dup``...): tokens
    that are not ours are left to them; a ``gen_ai`` token we do not know warns once and is
    ignored. ``/dup`` wins over the plain value, as the other signals' rule has it.
    """
    if kwarg is not None:
        if kwarg in _MODES:
            return SemconvMode(kwarg)
        _log.warning("chatter-otel: ignoring semconv_opt_in=%r (expected one of %s); using %r",
                     kwarg, ", ".join(_MODES), DEFAULT)  # fmt: skip
        return SemconvMode(DEFAULT)
    raw = os.environ.get(ENV_SEMCONV_OPT_IN) or ""
    tokens = {t.strip() for t in raw.split(",") if t.strip()}
    for token in tokens:
        if token.startswith("gen_ai") and token not in _MODES:
            _log.warning("chatter-otel: ignoring %r in %s (expected %s or %s)",
                         token, ENV_SEMCONV_OPT_IN, LATEST, DUAL)  # fmt: skip
    if DUAL in tokens:
        return SemconvMode(DUAL)
    return SemconvMode(LATEST if LATEST in tokens else DEFAULT)
