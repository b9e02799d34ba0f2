"""``chatter-otel trace ID --html FILE``, opened in a real browser: Debian's Chromium (installed
by scripts/services.sh), driven by Playwright. A missing browser fails the test, never skips it.
The screenshot of each page is kept in build/test-artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.types import Command
from opentelemetry import trace

from chatter_otel import LocalTraceStore, last_run, track_workflow
from chatter_otel.reference.agent_demo import build_approval_graph
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.traces.cli import main

if TYPE_CHECKING:
    from collections.abc import Iterator

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: scripts/services.sh start installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _page(browser: Any, html: Path, name: str) -> tuple[Any, list[str], list[str]]:
    """The page loaded from the file, what it asked the network for, and its dialogs."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    asked: list[str] = []
    dialogs: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(html.as_uri())
    page.wait_for_selector("body[data-rendered]", timeout=10_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    return page, asked, dialogs


def _html(store: LocalTraceStore, trace_id: str, out: Path, capsys: Any) -> Path:
    assert main(["trace", trace_id, "--html", str(out), "--store", str(store.path)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: trace {trace_id}")
    return out


def _failing_run() -> Any:
    def note(state: MessagesState) -> dict[str, Any]:
        trace.get_current_span().set_attribute("app.note", HOSTILE)  # a hostile value
        raise ValueError("the model said no")

    g = StateGraph(MessagesState)
    g.add_node("note", note)
    g.add_edge(START, "note")
    graph = g.compile(name="fails")
    with pytest.raises(ValueError), track_workflow("turn", correlation_id="req-html-9") as run:
        build_chat_graph().invoke({"messages": [HumanMessage("weather in Oslo")]})
        graph.invoke({"messages": [HumanMessage("x")]})
    return run


def test_the_page_is_the_trace_waterfall_in_a_real_browser(
    store: LocalTraceStore, browser: Any, tmp_path: Path, capsys: Any
) -> None:
    run = _failing_run()
    spans = store.trace(run.trace_id)
    html = _html(store, run.trace_id, tmp_path / "trace.html", capsys)
    text = html.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    page, asked, dialogs = _page(browser, html, "failed-run")
    assert asked == [html.as_uri()]  # nothing but the file itself: no CDN, no network
    assert dialogs == [] and page.evaluate("window.pwned") is None  # values are text
    # the header: correlation id and totals
    assert page.inner_text(".correlation b") == "req-html-9"
    chats = [s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"]
    tin = sum(int(s.attributes["gen_ai.usage.input_tokens"]) for s in chats)
    tout = sum(int(s.attributes["gen_ai.usage.output_tokens"]) for s in chats)
    assert page.inner_text(".total-tokens b") == f"{tin}/{tout}"
    assert page.inner_text(".total-spans b") == str(len(spans))
    assert page.inner_text(".total-errors b") == str(sum(s.status == "ERROR" for s in spans))
    # one row per span, children under their parents, in start order
    rows = page.query_selector_all(".row:not(.head)")
    assert len(rows) == len(spans) == int(page.get_attribute("body", "data-rendered") or 0)
    names = [r.query_selector(".label").inner_text() for r in rows]
    assert names[0] == "invoke_workflow turn" and sorted(names) == sorted(s.name for s in spans)
    by_id = {s.span_id: s for s in spans}
    order = [r.get_attribute("data-span-id") for r in rows]
    for i, sid in enumerate(order):  # a parent comes before its children
        parent = by_id[sid].parent_id
        assert parent is None or parent not in by_id or order.index(parent) < i
    # bars to scale: the root spans the whole lane, each bar inside it at its offset
    start = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - start
    lane = rows[0].query_selector(".lane").bounding_box()
    for row in rows:
        s = by_id[row.get_attribute("data-span-id")]
        bar = row.query_selector(".bar").bounding_box()
        want_x = lane["x"] + (s.start_ns - start) / total * lane["width"]
        want_w = (s.end_ns - s.start_ns) / total * lane["width"]
        assert abs(bar["x"] - want_x) <= 1.5 and abs(bar["width"] - max(want_w, 1)) <= 1.5
    # tokens and cost per LLM call; failed spans highlighted with their error type
    for row in rows:
        s = by_id[row.get_attribute("data-span-id")]
        if s in chats:
            a = s.attributes
            assert row.query_selector(".tokens").inner_text() == (
                f"{a['gen_ai.usage.input_tokens']}/{a['gen_ai.usage.output_tokens']}"
            )
            assert row.query_selector(".cost").inner_text() == (
                f"${float(a['gen_ai.usage.cost.amount']):.7f}"
            )
        failed = "error" in (row.get_attribute("class") or "")
        assert failed == (s.status == "ERROR")
        if failed and s.attributes.get("error.type"):
            assert s.attributes["error.type"] in row.inner_text()
    # attributes on click, the hostile one shown as characters
    note = next(r for r in rows if by_id[r.get_attribute("data-span-id")].attributes.get(
        "app.note"))  # fmt: skip
    assert not page.is_visible("#details")
    note.click()
    assert page.is_visible("#details")
    cells = page.query_selector_all("#details td")
    shown = dict(zip([c.inner_text() for c in cells[::2]], [c.inner_text() for c in cells[1::2]],
                     strict=True))  # fmt: skip
    assert shown["app.note"] == HOSTILE and page.evaluate("window.pwned") is None
    assert shown["span id"] == note.get_attribute("data-span-id")
    assert (ARTIFACTS / "failed-run.png").stat().st_size > 10_000
    page.close()


def test_paused_and_resumed_runs_are_marked(
    store: LocalTraceStore, browser: Any, tmp_path: Path, capsys: Any
) -> None:
    graph = build_approval_graph()
    cfg: Any = {"configurable": {"thread_id": "html-thread"}}
    graph.invoke({"question": "Refund?"}, cfg)
    paused = last_run()
    graph.invoke(Command(resume="yes"), cfg)
    resumed = last_run()
    assert paused is not None and resumed is not None
    for run, mark in ((paused, "paused"), (resumed, "resumed")):
        html = _html(store, run.trace_id, tmp_path / f"{mark}.html", capsys)
        page, asked, _ = _page(browser, html, mark)
        assert asked == [html.as_uri()]
        root = page.query_selector(".row:not(.head)")
        assert root.query_selector(f".mark.{mark}") is not None, root.inner_text()
        page.close()


def test_a_trace_that_cannot_be_written_is_one_line(
    store: LocalTraceStore, tmp_path: Path, capsys: Any
) -> None:
    run = _failing_run()
    code = main(["trace", run.trace_id, "--html", str(tmp_path / "no" / "such" / "dir.html"),
                 "--store", str(store.path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot write" in err
    json.dumps(err)  # one plain line
