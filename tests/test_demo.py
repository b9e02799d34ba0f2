"""The README's first command: ``chatter-otel demo`` works and shows the run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys


def test_demo_command_prints_the_trace_and_usage() -> None:
    exe = shutil.which("chatter-otel") or f"{sys.prefix}/bin/chatter-otel"
    proc = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert re.fullmatch(r"trace [0-9a-f]{32}  correlation_id=demo-[0-9a-f]{12}", lines[0])
    tree = "\n".join(lines[1:9])
    for name in (
        "invoke_workflow chat",
        "invoke_node agent",
        "chat chatter-local-1",
        "invoke_node tools",
        "execute_tool get_weather",
    ):
        assert name in tree
    assert tree.count("chat chatter-local-1") == 2
    assert "answer:          Here is what I found: Paris: 18°C, light rain" in out
    trace_id = re.search(r"trace_id:\s+([0-9a-f]{32})", out).group(1)
    assert lines[0].startswith(f"trace {trace_id}")
    usage = re.search(
        r"prompt_tokens=(\d+) completion_tokens=(\d+) total_tokens=(\d+) cost=([0-9.E-]+) USD",
        out,
    )
    p, c, t = (int(usage.group(i)) for i in (1, 2, 3))
    assert (p, c, t) == (16, 11, 27)  # the local model is deterministic
    assert "llm_calls=2 tool_calls=1" in out
    assert "Traceback" not in proc.stderr
