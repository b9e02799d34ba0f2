"""Retrievers as `retrieval {data source}` spans, sync and async, under their node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langgraph.graph import END, START, StateGraph
from opentelemetry.trace import StatusCode
from typing_extensions import TypedDict

from chatter_otel import track_workflow

if TYPE_CHECKING:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun


class KB(BaseRetriever):
    """A retriever over three fixed documents."""

    fail: bool = False

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        if self.fail:
            raise LookupError(f"index offline for {query}")
        return [Document(page_content=f"doc {i} about {query}", id=f"d{i}",
                         metadata={"score": 1.0 - i / 10}) for i in range(3)]  # fmt: skip


class S(TypedDict):
    q: str
    n: int


def _graph(retriever: KB) -> Any:
    def lookup(state: S) -> S:
        return {"q": state["q"], "n": len(retriever.invoke(state["q"]))}

    async def alookup(state: S) -> S:
        return {"q": state["q"], "n": len(await retriever.ainvoke(state["q"]))}

    g = StateGraph(S)
    g.add_node("lookup", lookup)
    g.add_node("alookup", alookup)
    g.add_edge(START, "lookup")
    g.add_edge("lookup", "alookup")
    g.add_edge("alookup", END)
    return g.compile(name="rag")


async def test_retrieval_spans_sync_and_async(spans: Any) -> None:
    async with track_workflow("w", conversation_id="c-r"):
        out = await _graph(KB()).ainvoke({"q": "paris", "n": 0})
    assert out["n"] == 3
    found = spans.named("retrieval KB")
    assert len(found) == 2
    for span, node in zip(found, ("invoke_node lookup", "invoke_node alookup"), strict=True):
        assert spans.parent_of(span).name == node
        a = span.attributes
        assert a["gen_ai.operation.name"] == "retrieval"
        assert a["gen_ai.data_source.id"] == "KB"
        assert a["chatter.retrieval.documents"] == 3
        assert a["gen_ai.conversation.id"] == "c-r"
        assert "gen_ai.retrieval.query.text" not in a  # capture is off
        assert "gen_ai.retrieval.documents" not in a


def test_retrieval_content_only_under_capture(instrument: Any) -> None:
    spans = instrument(capture_content=True)
    KB().invoke("oslo")
    a = spans.one("retrieval KB").attributes
    assert a["gen_ai.retrieval.query.text"] == '"oslo"'
    assert '"id":"d0"' in a["gen_ai.retrieval.documents"]
    assert "doc 2 about oslo" in a["gen_ai.retrieval.documents"]


def test_a_failing_retriever(spans: Any) -> None:
    with pytest.raises(LookupError):
        KB(fail=True).invoke("rome")
    span = spans.one("retrieval KB")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "LookupError"
    assert "rome" not in (span.status.description or "")  # the message is content: off
