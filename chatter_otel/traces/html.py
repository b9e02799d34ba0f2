"""One trace as a self-contained HTML page: ``chatter-otel trace ID --html FILE``.

A waterfall (one row per span, indented under its parent, a bar to scale of the whole trace),
tokens and cost per span, failed spans highlighted with their error type, paused and resumed
runs marked, every attribute of a span on click; the correlation id and the totals on top. No
network: the styles, the script and the spans are in the file, the page asks for nothing
(``Content-Security-Policy: default-src 'none'``, with only its own inline style and script
allowed by hash). Every value is put in the page as text, never as markup: a prompt or a
header holding ``<script>`` shows as those characters.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from chatter_otel.export.store import TraceSummary

if TYPE_CHECKING:
    from collections.abc import Sequence

    from chatter_otel.traces.spans import SpanRecord

__all__ = ["render_html"]

_STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#fff}
header{padding:12px 16px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
h1{font-size:15px;margin:0 0 6px}
.totals span{margin-right:18px;white-space:nowrap}
.totals b{font-weight:600}
#rows{font-family:ui-monospace,monospace;font-size:12px}
.row{display:grid;grid-template-columns:minmax(260px,38%) 1fr 90px 96px;align-items:center;
 border-bottom:1px solid #eef1f4;cursor:pointer;min-height:22px;
 content-visibility:auto;contain-intrinsic-size:auto 23px}
.row:hover{background:#f3f6fa}.row.selected{background:#e7f0ff}
.name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap;padding:0 6px}
.lane{position:relative;height:14px;margin:0 6px;background:#fafbfc}
.bar{position:absolute;top:2px;height:10px;background:#4c8bf5;border-radius:2px;min-width:1px}
.row.error .bar{background:#d1242f}.row.error .name{color:#d1242f;font-weight:600}
.tokens,.cost{text-align:right;padding:0 8px;color:#57606a}
.mark{font-size:11px;margin-left:6px;padding:0 4px;border-radius:3px;background:#fff3c4}
#details{position:sticky;bottom:0;max-height:40vh;overflow:auto;border-top:2px solid #d0d7de;
 background:#fff;padding:8px 16px;display:none}
#details.open{display:block}
#details table{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px}
#details td{border-bottom:1px solid #eef1f4;padding:2px 10px 2px 0;vertical-align:top}
#details td:first-child{color:#57606a;white-space:nowrap}
#details td:last-child{white-space:pre-wrap;word-break:break-all}
.head{font-weight:600;cursor:default;background:#f6f8fa}
"""

_SCRIPT = """
(function () {
  const t0 = performance.now();
  const data = JSON.parse(document.getElementById("trace-data").textContent);
  const spans = data.spans, total = Math.max(data.end - data.start, 1);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const ids = new Set(spans.map(s => s.span_id)), kids = new Map();
  for (const s of spans) {
    const p = ids.has(s.parent_id) ? s.parent_id : null;
    if (!kids.has(p)) kids.set(p, []);
    kids.get(p).push(s);
  }
  for (const list of kids.values()) list.sort((a, b) => a.start_ns - b.start_ns);
  const order = [], stack = (kids.get(null) || []).slice().reverse().map(s => [s, 0]);
  const seen = new Set();
  while (stack.length) {
    const [s, depth] = stack.pop();
    if (seen.has(s.span_id + "/" + s.start_ns)) continue;
    seen.add(s.span_id + "/" + s.start_ns);
    order.push([s, depth]);
    for (const k of (kids.get(s.span_id) || []).slice().reverse()) stack.push([k, depth + 1]);
  }
  const rows = document.getElementById("rows"), frag = document.createDocumentFragment();
  const details = document.getElementById("details");
  const head = el("div", "row head");
  for (const h of ["span", "timeline", "tokens", "cost"]) head.appendChild(el("div", "name", h));
  frag.appendChild(head);
  const number = v => typeof v === "number" ? v : null;
  order.forEach(([s, depth], i) => {
    const a = s.attributes, row = el("div", "row");
    row.dataset.spanId = s.span_id;
    row.dataset.index = String(i);
    if (s.status === "ERROR") row.classList.add("error");
    const name = el("div", "name");
    name.style.paddingLeft = (6 + depth * 14) + "px";
    name.appendChild(el("span", "label", s.name));
    if (s.status === "ERROR" && a["error.type"]) {
      name.appendChild(el("span", "mark", String(a["error.type"])));
    }
    if (a["chatter.interrupted"] === true) name.appendChild(el("span", "mark paused", "paused"));
    else if (a["langgraph.checkpoint.id"]) name.appendChild(el("span", "mark resumed", "resumed"));
    name.title = s.name + " — " + ((s.end_ns - s.start_ns) / 1e6).toFixed(1) + " ms";
    const lane = el("div", "lane"), bar = el("div", "bar");
    bar.style.left = ((s.start_ns - data.start) / total * 100) + "%";
    bar.style.width = ((s.end_ns - s.start_ns) / total * 100) + "%";
    bar.title = ((s.end_ns - s.start_ns) / 1e6).toFixed(1) + " ms";
    lane.appendChild(bar);
    const tin = number(a["gen_ai.usage.input_tokens"]);
    const tout = number(a["gen_ai.usage.output_tokens"]);
    const cost = number(a["gen_ai.usage.cost.amount"]);
    row.append(name, lane,
      el("div", "tokens", tin === null && tout === null ? "" : (tin ?? "-") + "/" + (tout ?? "-")),
      el("div", "cost", cost === null ? "" : "$" + cost.toFixed(7)));
    row.addEventListener("click", () => show(s, row));
    frag.appendChild(row);
  });
  rows.appendChild(frag);
  let selected = null;
  function show(s, row) {
    if (selected) selected.classList.remove("selected");
    selected = row; row.classList.add("selected");
    details.replaceChildren(el("h1", "", s.name));
    const table = el("table"), add = (k, v) => {
      const tr = el("tr"); tr.append(el("td", "", k), el("td", "", v)); table.appendChild(tr);
    };
    add("span id", s.span_id); add("parent", s.parent_id || "-"); add("kind", s.kind);
    add("status", s.status + (s.status_message ? ": " + s.status_message : ""));
    add("duration", ((s.end_ns - s.start_ns) / 1e6).toFixed(3) + " ms");
    for (const k of Object.keys(s.attributes).sort()) {
      const v = s.attributes[k];
      add(k, typeof v === "string" ? v : JSON.stringify(v));
    }
    details.appendChild(table);
    details.classList.add("open");
  }
  document.body.dataset.rendered = String(order.length);
  document.body.dataset.renderMs = (performance.now() - t0).toFixed(1);
})();
"""


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _text(value: str) -> str:
    """Text for HTML element content (the page's fixed parts: title, header)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_html(records: Sequence[SpanRecord]) -> str:
    """The page for one trace's spans (see the module docstring)."""
    summary = TraceSummary.of(records)
    spans = [asdict(r) for r in records]
    for span in spans:
        span["attributes"] = dict(span["attributes"])
    doc = {"start": min(r.start_ns for r in records), "end": max(r.end_ns for r in records),
           "spans": spans}  # fmt: skip
    # In a <script> element only "</" can end it early: escaped, the JSON stays JSON.
    payload = json.dumps(doc, default=str).replace("</", "<\\/").replace("<!--", "<\\!--")
    errors = sum(r.status == "ERROR" for r in records)
    tin = summary.input_tokens if summary.input_tokens is not None else "-"
    tout = summary.output_tokens if summary.output_tokens is not None else "-"
    cost = f"${summary.cost:.7f}" if summary.cost is not None else "-"
    totals = [("duration", f"{summary.duration_ms:.1f} ms"), ("spans", str(len(records))),
              ("errors", str(errors)), ("tokens", f"{tin}/{tout}"), ("cost", cost),
              ("model", summary.model or "-")]  # fmt: skip
    policy = (f"default-src 'none'; style-src {_sha(_STYLE)}; "
              f"script-src {_sha(_SCRIPT)}; img-src data:")  # fmt: skip
    items = "".join(f'<span class="total-{k}">{k} <b>{_text(v)}</b></span>' for k, v in totals)
    title = f"trace {summary.trace_id}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>{_text(title)}</h1><div class="correlation">correlation id '
        f"<b>{_text(summary.correlation_id or '-')}</b></div>"
        f'<div class="totals">{items}</div></header>'
        '<main id="rows"></main><section id="details"></section>'
        f'<script type="application/json" id="trace-data">{payload}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
