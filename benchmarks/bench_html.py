"""``chatter-otel trace ID --html``: does a 5,000-span trace render in under a second?

Builds a trace of ``--spans`` spans (default 5,000: a workflow, nodes, LLM calls with tokens
and cost, tool calls, some failed), writes its page with ``render_html``, opens it in Debian's
Chromium (headless, through Playwright, as the tests do) and reports, best of ``--repeat``:
the time to write the page, the page's own script time (``data-render-ms``) and the time from
navigation to every row drawn. Exit 1 when the last is over ``--max-s`` (default 1.0).

    python -m benchmarks.bench_html [--spans N] [--repeat K] [--max-s S]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from chatter_otel.traces.html import render_html
from chatter_otel.traces.spans import SpanRecord
from tests.test_trace_html import CHROMIUM_ARGS


def big_trace(n: int) -> list[SpanRecord]:
    tid = "ab" * 16
    start = time.time_ns()
    out = [SpanRecord(tid, f"{0:016x}", None, "invoke_workflow chat", start, start + n * 200_000,
                      "OK", attributes={"chatter.correlation.id": "req-bench"})]  # fmt: skip
    for i in range(1, n):
        parent = f"{(i - 1) // 10 * 10:016x}" if i % 10 else f"{0:016x}"
        s = start + i * 150_000
        attrs: dict[str, object] = {}
        name = f"invoke_node step-{i}"
        if i % 10 == 3:
            name = "chat gpt-4o-mini"
            attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                     "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 30,
                     "gen_ai.usage.cost.amount": 0.0000360}  # fmt: skip
        failed = i % 97 == 0
        if failed:
            attrs["error.type"] = "TimeoutError"
        out.append(SpanRecord(tid, f"{i:016x}", parent, name, s, s + 100_000,
                              "ERROR" if failed else "OK", attributes=attrs))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-s", type=float, default=1.0)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    records = big_trace(args.spans)
    with tempfile.TemporaryDirectory() as folder:
        page_file = Path(folder) / "trace.html"
        writes, scripts, shown = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            page_file.write_text(render_html(records), encoding="utf-8")
            writes.append(time.perf_counter() - t0)
        chromium = shutil.which("chromium")
        assert chromium, "Debian's chromium is missing: scripts/services.sh start installs it"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            for _ in range(args.repeat):
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(page_file.as_uri())
                page.wait_for_selector("body[data-rendered]", timeout=30_000)
                shown.append(time.perf_counter() - t0)
                scripts.append(float(page.get_attribute("body", "data-render-ms") or 0) / 1000)
                rows = page.locator(".row:not(.head)").count()
                assert rows == args.spans, rows
                page.close()
            browser.close()
    size = len(render_html(records)) / 2**20
    print(f"trace of {args.spans} spans, page {size:.1f} MiB, best of {args.repeat}:")
    print(f"  write the page          {min(writes):.3f} s")
    print(f"  the page's script       {min(scripts):.3f} s")
    print(f"  navigation to all rows  {min(shown):.3f} s (at most {args.max_s:g})")
    raise SystemExit(1 if min(shown) > args.max_s else 0)


if __name__ == "__main__":
    main()
