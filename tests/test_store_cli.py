"""The local trace store and the incident CLI (``trace``, ``find``) on top of it."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage

from chatter_otel import LocalTraceStore, track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.traces.cli import main
from chatter_otel.traces.spans import SpanRecord
from tests.forking import in_forked_child

if TYPE_CHECKING:
    from pathlib import Path


def _turn(conversation: str, correlation: str, message: str, fail: bool = False) -> Any:
    with track_workflow(
        "turn", conversation_id=conversation, correlation_id=correlation, message_id=message
    ) as run:
        build_chat_graph().invoke({"messages": [HumanMessage("weather in Oslo")]})
        if fail:
            raise RuntimeError("after the graph")
    return run


def _cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_shows_the_tree(store: Any, capsys: Any) -> None:
    run = _turn("c1", "corr-1", "m1")
    code, out, err = _cli(capsys, "trace", run.trace_id, "--store", str(store.path))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"trace {run.trace_id}  correlation_id=corr-1"
    assert lines[1].startswith("└── invoke_workflow turn")
    assert all(len(line) <= 80 for line in lines)  # fits a terminal: labels wrap
    assert sum("chat chatter-local-1" in line for line in lines) == 2
    assert any("execute_tool get_weather" in line for line in lines)
    # the tree's token totals equal the run's
    assert f"tokens={run.usage.prompt_tokens}/{run.usage.completion_tokens}" in lines[1]


def test_trace_json_round_trips_every_span(store: Any, capsys: Any) -> None:
    run = _turn("c1", "corr-1", "m1")
    code, out, _ = _cli(capsys, "trace", run.trace_id.upper(), "--json", "--store", str(store.path))
    assert code == 0
    spans = json.loads(out)
    assert len(spans) == 8
    by_id = {s["span_id"]: s for s in spans}
    for s in spans:
        assert s["trace_id"] == run.trace_id
        assert s["parent_id"] is None or s["parent_id"] in by_id
    chat = next(s for s in spans if s["name"] == "chat chatter-local-1")
    assert chat["kind"] == "CLIENT"
    assert chat["attributes"]["gen_ai.response.finish_reasons"] in (["tool_calls"], ["stop"])
    assert isinstance(chat["attributes"]["gen_ai.usage.input_tokens"], int)


def test_find_by_each_id_newest_first(store: Any, capsys: Any) -> None:
    a = _turn("conv-a", "corr-x", "msg-1")
    time.sleep(0.01)
    b = _turn("conv-a", "corr-y", "msg-2")
    with pytest.raises(RuntimeError):
        _turn("conv-b", "corr-x", "msg-3", fail=True)
    db = str(store.path)
    code, out, _ = _cli(capsys, "find", "--conversation-id", "conv-a", "--json", "--store", db)
    assert code == 0
    found = json.loads(out)
    assert [t["trace_id"] for t in found] == [b.trace_id, a.trace_id]
    assert found[0]["input_tokens"] == b.usage.prompt_tokens
    assert found[0]["cost"] == pytest.approx(float(b.usage.cost))
    code, out, _ = _cli(capsys, "find", "--correlation-id", "corr-x", "--json", "--store", db)
    statuses = {t["conversation_id"]: t["status"] for t in json.loads(out)}
    assert statuses == {"conv-a": "OK", "conv-b": "ERROR"}
    code, out, _ = _cli(capsys, "find", "--message-id", "msg-2", "--store", db)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.startswith("UTC ") and "trace id" in header
    assert all(len(line) <= 80 for line in (header, *rows))
    assert len(rows) == 1 and b.trace_id in rows[0] and "invoke_w" in rows[0]
    assert header.split()[2:4] == ["status", "ms"] and rows[0].split()[1] == "ok"
    code, out, _ = _cli(capsys, "find", "--correlation-id", "corr-x", "--store", db)
    # a failed run reads as one without colour: its status is a word
    assert [r.split()[1] for r in out.splitlines()[1:]] == ["ERROR", "ok"]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["trace", "0" * 32], 1, "trace 00000000000000000000000000000000 not found"),
        (["trace", "not-a-trace"], 2, "not a trace id"),
        (["trace", "a" * 31], 1, "no trace id starts with aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        (["trace", "abc"], 2, "not a trace id"),
        (["ls", "--model", "nobody"], 1, "no traces matching the filters"),
        (["find"], 2, "find needs"),
        (["find", "--correlation-id", "nobody"], 1, "no trace found for correlation_id=nobody"),
    ],
)
def test_errors_are_one_line_with_exit_codes(
    store: Any, capsys: Any, argv: list[str], code: int, message: str
) -> None:
    _turn("c", "corr", "m")
    got, out, err = _cli(capsys, *argv, "--store", str(store.path))
    assert got == code
    assert out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_missing_and_corrupt_store(tmp_path: Any, capsys: Any) -> None:
    code, _, err = _cli(capsys, "trace", "a" * 32, "--store", str(tmp_path / "none.db"))
    assert code == 2 and "no trace store" in err
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    code, _, err = _cli(capsys, "trace", "a" * 32, "--store", str(bad))
    assert code == 2 and "cannot read the trace store" in err


def _rec(trace: str, span: str, start_ns: int) -> SpanRecord:
    return SpanRecord(trace, span, None, "s", start_ns, start_ns + 1, "UNSET")


def test_writes_are_idempotent_and_retention_is_bounded(tmp_path: Any) -> None:
    store = LocalTraceStore(tmp_path / "r.db", max_spans=50, max_age_s=3600)
    now = time.time_ns()
    batch = [_rec("a" * 32, f"{i:016x}", now + i) for i in range(10)]
    store.write(batch)
    store.write(batch)  # a retried batch
    assert len(store.trace("a" * 32)) == 10
    store.write([_rec("b" * 32, f"{i:016x}", now + 100 + i) for i in range(100)])
    store.write([_rec("c" * 32, "0" * 16, now - int(7200 * 1e9))])  # older than max_age
    store.prune()
    assert store.trace("c" * 32) == []
    assert len(store.trace("a" * 32)) + len(store.trace("b" * 32)) == 50
    assert store.trace("a" * 32) == []  # the oldest went first


def test_processes_starting_together_on_a_new_store_all_write(tmp_path: Any) -> None:
    """Several app workers (here: threads with their own connections) open one new store file
    at the same moment: SQLite refuses, without waiting, all but one switch to WAL; none of them
    may lose its first batch to that."""
    for attempt in range(10):
        path = tmp_path / f"s{attempt}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def worker(n: int, path: Any = path, start: Any = start, errors: Any = errors) -> None:
            store = LocalTraceStore(path)
            start.wait()
            try:
                store.write([_rec(f"{n:032x}", f"{i:016x}", time.time_ns()) for i in range(20)])
            except BaseException as exc:
                errors.append(exc)
            finally:
                store.close()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        store = LocalTraceStore(path)
        assert [len(store.trace(f"{n:032x}")) for n in range(4)] == [20] * 4
        store.close()


def test_ls_lists_recent_runs_with_filters_and_an_exit_code_for_errors(
    store: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _turn("conv-a", "corr-a", "m1")
    with pytest.raises(RuntimeError):
        _turn("conv-b", "corr-b", "m2", fail=True)
    c = _turn("conv-a", "corr-c", "m3")
    db = str(store.path)
    code, out, _ = _cli(capsys, "ls", "--store", db)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[2] == "status"  # "UTC", the day, then the status word
    assert "model" in header and "correlation id" in header
    assert all(len(line) <= 80 for line in out.splitlines())
    assert [r.split()[1] for r in rows] == ["ok", "ERROR", "ok"]  # newest first
    assert rows[0].split()[5] == c.trace_id[:12] and "chatter-local" in rows[0]
    # the listed prefix is enough for `trace`
    code, out, _ = _cli(capsys, "trace", c.trace_id[:12], "--store", db)
    assert code == 0 and out.splitlines()[0].startswith(f"trace {c.trace_id}")
    # filters, and the exit code a script can alert on
    code, out, _ = _cli(capsys, "ls", "--errors", "--json", "--store", db)
    assert code == 3 and [t["correlation_id"] for t in json.loads(out)] == ["corr-b"]
    code, out, _ = _cli(capsys, "ls", "--conversation", "conv-a", "--json", "--store", db)
    assert [t["trace_id"] for t in json.loads(out)] == [c.trace_id, a.trace_id]
    code, out, _ = _cli(capsys, "ls", "--model", "chatter-local-1", "--limit", "2", "--json",
                        "--store", db)  # fmt: skip
    got = json.loads(out)
    assert code == 0 and len(got) == 2 and {t["model"] for t in got} == {"chatter-local-1"}
    code, out, _ = _cli(capsys, "ls", "--since", "1h", "--json", "--store", db)
    assert len(json.loads(out)) == 3
    # wider with COLUMNS: nothing cut
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = _cli(capsys, "ls", "--store", db)
    assert "corr-c" in out.splitlines()[1] and max(len(line) for line in out.splitlines()) > 80
    # no failures in the window: exit 0 and a word, not an empty screen
    code, out, _ = _cli(capsys, "ls", "--errors", "--since", "0s", "--store", db)
    assert code == 0 and out.strip() == "no failed runs"


def test_trace_shows_the_error_type_and_message(store: Any, capsys: Any) -> None:
    with pytest.raises(RuntimeError):
        _turn("c9", "corr-9", "m9", fail=True)
    (t,) = json.loads(_cli(capsys, "ls", "--json", "--store", str(store.path))[1])
    _, out, _ = _cli(capsys, "trace", t["trace_id"], "--store", str(store.path))
    wf = next(line for line in out.splitlines() if "invoke_workflow turn" in line)
    assert "ERROR RuntimeError" in wf


def test_tail_prints_runs_as_they_end_and_ends_on_ctrl_c(store: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    store.last_rowid()  # the store exists (tail reads one; it says so when there is none)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatter_otel", "tail", "--interval", "0.1", "--store",
         str(store.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    try:
        time.sleep(2.0)  # started, and polling
        ok = _turn("c1", "corr-t1", "m1")
        with pytest.raises(RuntimeError):
            _turn("c2", "corr-t2", "m2", fail=True)
        lines: list[str] = []
        assert proc.stdout is not None
        import queue

        got: queue.Queue[str] = queue.Queue()
        out = proc.stdout
        threading.Thread(target=lambda: [got.put(line) for line in out], daemon=True).start()
        deadline = time.monotonic() + 30  # bounded: a tail that prints nothing fails, not hangs
        while len(lines) < 2 and time.monotonic() < deadline:
            try:
                lines.append(got.get(timeout=max(deadline - time.monotonic(), 0.01)).rstrip())
            except queue.Empty:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, (lines, err)
    assert [line.split()[1:2] for line in lines] == [["ok"], ["ERROR"]], (lines, err)
    assert ok.trace_id[:12] in lines[0] and "corr-t1" in lines[0] and "corr-t2" in lines[1]


def test_python_dash_m_gives_the_exit_code(tmp_path: Any) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "chatter_otel", "ls", "--store",
                           str(tmp_path / "none.db")], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 2 and "no trace store" in proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    """SQLite's rule for fork: the child does not use the parent's connection. Both processes
    write through the same store object after the fork and each reads every span."""
    store = LocalTraceStore(tmp_path / "f.db")
    now = time.time_ns()
    store.write([_rec("a" * 32, f"{i:016x}", now + i) for i in range(5)])
    before = store._db()  # the parent's connection, open at the fork

    def child() -> str:
        own = store._db()
        store.write([_rec("b" * 32, f"{i:016x}", now + 10 + i) for i in range(5)])
        return f"{own is not before} {len(store.trace('a' * 32))} {len(store.trace('b' * 32))}"

    assert in_forked_child(child) == "True 5 5"
    assert store._db() is before  # the parent's stays its own
    store.write([_rec("c" * 32, "0" * 15 + "1", now + 20)])
    assert [len(store.trace(t * 32)) for t in "abc"] == [5, 5, 1]
    store.close()
