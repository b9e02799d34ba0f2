"""No code at all: ``opentelemetry-instrument`` finds the instrumentor through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = """
from langchain_core.messages import HumanMessage
from chatter_otel.reference.demo import build_chat_graph
out = build_chat_graph().invoke({"messages": [HumanMessage("weather in Rome")]})
print(out["messages"][-1].content)
"""


def _instrumented(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``opentelemetry-instrument python script``, as a user runs it; it must succeed."""
    bindir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bindir / "opentelemetry-instrument"), sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def test_opentelemetry_instrument_exports_the_graph(otlp_http: Any, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    prices = tmp_path / "prices.json"
    prices.write_text('{"chatter-local-1": {"input_mtok": 0.5, "output_mtok": 1.5}}')
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "zero-code-app",
        "CHATTER_OTEL_PRICES_FILE": str(prices),
    }
    proc = _instrumented(script, env)
    assert proc.stdout.strip() == "Here is what I found: Rome: 20°C, sunny"
    got = otlp_http.wait_for(7)
    assert sorted(s.name for _, s in got) == [
        "chat chatter-local-1",
        "chat chatter-local-1",
        "execute_tool get_weather",
        "invoke_node agent",
        "invoke_node agent",
        "invoke_node tools",
        "invoke_workflow chat",
    ]
    assert {res["service.name"] for res, _ in got} == {"zero-code-app"}
    chats = [s for _, s in got if s.name.startswith("chat ")]
    costs = [a.value.double_value for c in chats for a in c.attributes if a.key.endswith("amount")]
    assert len(costs) == 2 and all(c > 0 for c in costs)  # the prices file was read


PARITY = """
import json
from langchain_core.messages import HumanMessage
from chatter_otel import telemetry
from chatter_otel.reference.demo import build_chat_graph
out = build_chat_graph().invoke({"messages": [HumanMessage("weather in Rome")]})
tel = telemetry._current
tel.force_flush()
print(json.dumps({
    "answer": out["messages"][-1].content,
    "monitoring": tel.monitoring.get_workflow_stats()["workflow_ops"],
    "analytics": tel.analytics.snapshot()["model"]["chatter-local-1"]["calls"],
}))
"""


def test_zero_code_gets_the_processors_and_the_local_store(tmp_path: Path) -> None:
    """opentelemetry-instrument alone: OTEL_TRACES_EXPORTER names the local store (and console
    beside it); the instrumentor sets up monitoring, events and analytics on the distro's
    provider."""
    script = tmp_path / "app.py"
    script.write_text(PARITY)
    store = tmp_path / "traces.db"
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "chatter_local,console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "zero-code-app",
        "CHATTER_OTEL_TRACE_STORE": str(store),
    }
    proc = _instrumented(script, env)
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["answer"] == "Here is what I found: Rome: 20°C, sunny"
    assert got["monitoring"]["started"] == got["monitoring"]["finished"] == 1
    assert got["analytics"] == 2
    assert '"name": "invoke_workflow chat"' in proc.stdout  # the console exporter, beside
    from chatter_otel import LocalTraceStore

    db = LocalTraceStore(store)._db()
    names = sorted(n for (n,) in db.execute("SELECT name FROM spans"))
    assert names.count("invoke_workflow chat") == 1 and len(names) == 7


BAGGAGE_SCRIPT = """
import json
from opentelemetry import baggage, context, propagate
ctx = context.get_current()
for key, value in (("evil", "<script>"), ("user.id", "<img src=x>"),
                   ("chatter.correlation.id", "req-7"), ("tenant", "acme")):
    ctx = baggage.set_baggage(key, value, ctx)
headers = {}
propagate.inject(headers, context=ctx)
print(json.dumps(headers))
"""


def test_zero_code_forwards_only_the_allowed_baggage(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(BAGGAGE_SCRIPT)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none",
           "OTEL_LOGS_EXPORTER": "none",
           "CHATTER_OTEL_PROPAGATE_BAGGAGE_KEYS": "tenant"}  # fmt: skip
    proc = _instrumented(script, env)
    headers = json.loads(proc.stdout.strip().splitlines()[-1])
    entries = dict(e.split("=", 1) for e in headers["baggage"].split(","))
    assert entries == {"chatter.correlation.id": "req-7", "tenant": "acme"}
