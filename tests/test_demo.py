"""The README's first command, then the incident loop on its output: demo -> find -> trace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any


def _cli(*argv: str, store: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chatter-otel") or f"{sys.prefix}/bin/chatter-otel"
    env = {**os.environ, "CHATTER_OTEL_TRACE_STORE": store}
    return subprocess.run(
        [exe, *argv], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_demo_then_find_then_trace(tmp_path: Any) -> None:
    store = str(tmp_path / "traces.db")
    proc = _cli("demo", store=store)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert re.fullmatch(r"trace [0-9a-f]{32}  correlation_id=demo-[0-9a-f]{12}", lines[0])
    tree = lines[: lines.index("")]  # the tree, up to the blank line
    assert all(len(line) <= 80 for line in tree)
    for name in (
        "invoke_workflow chat",
        "invoke_node agent",
        "chat chatter-local-1",
        "invoke_node tools",
        "execute_tool get_weather",
    ):
        assert any(name in line for line in tree), name
    assert sum("chat chatter-local-1" in line for line in tree) == 2
    assert "answer:          Here is what I found: Paris: 18°C, light rain" in out
    trace_id = re.search(r"trace_id:\s+([0-9a-f]{32})", out).group(1)
    correlation_id = re.search(r"correlation_id:\s+(demo-[0-9a-f]{12})", out).group(1)
    usage = re.search(
        r"prompt_tokens=(\d+) completion_tokens=(\d+) total_tokens=(\d+)\s+cost=([0-9.E-]+) USD",
        out,
    )
    assert tuple(int(usage.group(i)) for i in (1, 2, 3)) == (16, 11, 27)  # deterministic model
    assert "llm_calls=2 tool_calls=1" in out
    assert f"stored in:       {store}" in out
    paths = ("stored in", "look it up", " " * 17 + "/", " " * 17 + ".")  # paths are as long as
    assert all(len(line) <= 80 for line in lines if not line.startswith(paths))  # they are
    assert "Traceback" not in proc.stderr

    found = _cli("find", "--correlation-id", correlation_id, store=store)
    assert found.returncode == 0, found.stderr
    assert trace_id in found.stdout and "16/11" in found.stdout

    shown = _cli("trace", trace_id, store=store)
    assert shown.returncode == 0, shown.stderr
    # The same tree as the demo printed (it read it from the same store).
    assert shown.stdout.splitlines() == tree


def test_the_printed_next_commands_work_as_printed(tmp_path: Any) -> None:
    """After `make demo` (which runs .venv/bin/chatter-otel, not on PATH), the commands the demo
    prints run as printed, from where it ran; and a miss in the local store says why it may be
    a miss for now."""
    store = str(tmp_path / "traces.db")
    exe = f"{sys.prefix}/bin/chatter-otel"
    env = {
        **os.environ,
        "CHATTER_OTEL_TRACE_STORE": store,
        "PATH": "/usr/bin:/bin",
    }  # as on a shell where the venv is not activated
    out = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=120, check=True,
                         env=env, cwd=tmp_path).stdout  # fmt: skip
    commands = [line.split(":", 1)[1].strip() if ":" in line else line.strip()
                for line in out.splitlines()[-2:]]  # fmt: skip
    assert commands[0].split()[1] == "trace" and commands[1].split()[1] == "find"
    for command in commands:
        run = subprocess.run(command.split(), capture_output=True, text=True, timeout=60,
                             check=False, env=env, cwd=tmp_path)  # fmt: skip
        assert run.returncode == 0, (command, run.stderr)
    miss = subprocess.run([exe, "find", "--correlation-id", "not-yet"], capture_output=True,
                          text=True, timeout=60, check=False, env=env)  # fmt: skip
    assert miss.returncode == 1
    assert "may not be there yet" in miss.stderr and miss.stderr.count("\n") == 1


def test_agents_demo_prints_the_agent_and_the_paused_and_resumed_runs(tmp_path: Any) -> None:
    store = str(tmp_path / "traces.db")
    proc = _cli("demo", "--agents", store=store)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    agent, paused, resumed = (part.split("\n\n")[0] for part in out.split(":\ntrace ")[1:])
    # the ReAct loop under its agent span, with the agent's roll-up
    assert re.search(r"└── invoke_agent weather .* tokens=9/10", agent)
    # create_agent's model node is "model"; create_react_agent's (without langchain) "agent"
    assert max(agent.count("invoke_node model"), agent.count("invoke_node agent")) == 2
    assert agent.count("chat chatter-local-1") == 2 and "execute_tool get_weather" in agent
    flat = lambda text: " ".join(text.split())  # noqa: E731 - long lines wrap at 80 columns
    checkpoint = re.search(r"paused at checkpoint ([0-9a-f-]{36})", flat(paused)).group(1)
    assert "invoke_node review" in paused and "invoke_node send" not in paused
    assert f"resumed from checkpoint {checkpoint}" in flat(resumed)
    assert "invoke_node send" in resumed and "invoke_node draft" not in resumed
    ids = re.findall(r"^trace ([0-9a-f]{32})", out, re.MULTILINE)
    assert len(set(ids)) == 3  # three traces

    # the same trees from the store, by trace id
    for tid, tree in zip(ids, (agent, paused, resumed), strict=True):
        shown = _cli("trace", tid, store=store)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == f"trace {tree}".strip()


def test_demo_json_is_the_run_and_its_usage(tmp_path: Any) -> None:
    import json

    store = str(tmp_path / "traces.db")
    proc = _cli("demo", "--json", store=store)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["usage"]["total_tokens"] == 27 and doc["usage"]["llm_calls"] == 2
    assert doc["usage"]["cost"] == "0.0000245" and doc["store_path"] == store
    listed = json.loads(_cli("ls", "--json", store=store).stdout)
    assert [t["trace_id"] for t in listed] == [doc["trace_id"]]
    assert listed[0]["correlation_id"] == doc["correlation_id"]
