"""Retriever runs as ``retrieval {data source}`` spans (see ``invocations`` for the pattern).

Attributes: ``gen_ai.operation.name=retrieval``, ``gen_ai.data_source.id`` (the retriever's
name), the app ids, and the number of documents returned (``chatter.retrieval.documents``).
The query text (``gen_ai.retrieval.query.text``) and the documents
(``gen_ai.retrieval.documents``: id, score where known, and content) only under content
capture, through the redaction hook and the size cap like every content attribute.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
    GEN_AI_DATA_SOURCE_ID,
    GEN_AI_OPERATION_NAME,
    GEN_AI_RETRIEVAL_DOCUMENTS,
    GEN_AI_RETRIEVAL_QUERY_TEXT,
    GenAiOperationNameValues,
)
from opentelemetry.trace import SpanKind

from chatter_otel._safety import internal_error
from chatter_otel.attributes import CHATTER_RETRIEVAL_DOCUMENTS
from chatter_otel.instrumentation import content as _content
from chatter_otel.instrumentation import records as r
from chatter_otel.instrumentation.invocations import Invocation

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from chatter_otel.instrumentation.runs import RunIds, WorkflowRun
    from chatter_otel.instrumentation.settings import Settings

_OP = GenAiOperationNameValues.RETRIEVAL.value


def data_source(serialized: Any, kwargs: dict[str, Any]) -> str:
    """The retriever's name: the run's name, else its class, else ``retriever``."""
    name = kwargs.get("name")
    if not name and isinstance(serialized, dict):
        ids = serialized.get("id")
        name = serialized.get("name") or (ids[-1] if isinstance(ids, list) and ids else None)
    return str(name or "retriever")[:256]


def _document(doc: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"content": str(getattr(doc, "page_content", doc))}
    doc_id = getattr(doc, "id", None)
    if doc_id is not None:
        item["id"] = str(doc_id)
    score = (getattr(doc, "metadata", None) or {}).get("score")
    if isinstance(score, int | float) and not isinstance(score, bool):
        item["score"] = float(score)
    return item


class RetrievalInvocation(Invocation):
    __slots__ = ("source",)

    def __init__(
        self, run_id: Any, ids: RunIds, parent: Invocation | None, workflow: WorkflowRun | None,
        tracer: Tracer, *, source: str, query: Any, settings: Settings,
    ) -> None:  # fmt: skip
        super().__init__(run_id, ids, parent, workflow, settings)
        self.source = source
        attrs: dict[str, Any] = {}
        try:  # given at the start: one call into the SDK
            attrs = {
                GEN_AI_OPERATION_NAME: _OP, GEN_AI_DATA_SOURCE_ID: source, **ids.attributes(),
                **self.agent_attributes(),
            }  # fmt: skip
            if settings.capture_content and isinstance(query, str):
                attrs[GEN_AI_RETRIEVAL_QUERY_TEXT] = _content.render(settings, "retrieval.query",
                                                                     query)  # fmt: skip
        except Exception:
            internal_error("RetrievalInvocation.start")
        self._open(tracer, f"retrieval {source}", SpanKind.INTERNAL, attrs)

    def stop(self, documents: Any, error: BaseException | None) -> None:
        end_ns = time.time_ns()
        record = None
        try:
            docs = list(documents) if isinstance(documents, list | tuple) else []
            if error is None and self.span.is_recording():
                try:
                    self.span.set_attribute(CHATTER_RETRIEVAL_DOCUMENTS, len(docs))
                    if self.settings.capture_content:
                        self.span.set_attribute(GEN_AI_RETRIEVAL_DOCUMENTS, _content.render(
                            self.settings, "retrieval.documents", [_document(d) for d in docs]
                        ))  # fmt: skip
                except Exception:
                    internal_error("RetrievalInvocation.attributes")
            status, etype, message = self._safe_outcome(error)
            record = r.RetrievalRecord(
                self.span_id, self.trace_id, self.workflow_id, self.ids, self.start_ns, end_ns,
                status, etype, message, self.source, len(docs),
            )  # fmt: skip
        except Exception:
            internal_error("RetrievalInvocation.stop")
        finally:
            self._close(record, end_ns)
