"""A pause in one worker process, its resume in another, one SQLite checkpointer file between
them: the resumed run links to the paused one (interrupt and static breakpoint; sync and
async), a new message on the thread links to nothing, and a forged stamp is ignored."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = "chatter.run.traceparent"


def worker(mode: str, db: Path, thread: str, tmp: Path) -> list[dict[str, Any]]:
    out = tmp / f"{mode}-{thread}.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests._pause_worker", mode, str(db), thread, str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(out.read_text()))


def workflow(spans: list[dict[str, Any]]) -> dict[str, Any]:
    (span,) = [s for s in spans if s["name"] == "invoke_workflow approve"]
    return span


def stamps(db: Path, thread: str) -> list[str | None]:
    """The stamp in every checkpoint of ``thread``, oldest first."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT metadata FROM checkpoints WHERE thread_id = ? "
                            "AND checkpoint_ns = '' ORDER BY checkpoint_id", (thread,))  # fmt: skip
        return [json.loads(m).get(STAMP) for (m,) in rows]


def traceparent(span: dict[str, Any]) -> str:
    """The span as a traceparent (flags 03: sampled, and the SDK's ids are random)."""
    return f"00-{span['trace_id']}-{span['span_id']}-03"


@pytest.mark.parametrize(
    ("pause", "resume"),
    [("interrupt", "resume"), ("interrupt", "aresume"), ("breakpoint", "continue")],
)
def test_a_resume_in_another_process_links_to_its_pause(
    tmp_path: Path, pause: str, resume: str
) -> None:
    db = tmp_path / "checkpoints.db"
    paused = workflow(worker(pause, db, "t-1", tmp_path))
    assert paused["attributes"]["chatter.interrupted"] is True
    assert "gen_ai.agent.paused" in paused["events"]
    # every checkpoint the paused run wrote names its span
    assert set(stamps(db, "t-1")) == {traceparent(paused)}

    resumed = workflow(worker(resume, db, "t-1", tmp_path))
    assert resumed["trace_id"] != paused["trace_id"]  # a new trace, joined by the link
    (link,) = resumed["links"]
    assert (link["trace_id"], link["span_id"]) == (paused["trace_id"], paused["span_id"])
    checkpoint = paused["attributes"]["langgraph.checkpoint.id"]
    assert link["attributes"] == {"langgraph.thread.id": "t-1",
                                  "langgraph.checkpoint.id": checkpoint}  # fmt: skip
    assert resumed["attributes"]["langgraph.thread.id"] == "t-1"
    assert resumed["attributes"]["langgraph.checkpoint.id"] == checkpoint
    assert resumed["events"].count("gen_ai.agent.resumed") == 1
    assert "chatter.interrupted" not in resumed["attributes"]  # it ran to the end
    # the checkpoints it wrote name it, after those of the paused run
    assert stamps(db, "t-1")[-1] == traceparent(resumed)


def test_a_new_message_on_the_thread_links_to_nothing(tmp_path: Path) -> None:
    db = tmp_path / "checkpoints.db"
    worker("breakpoint", db, "t-2", tmp_path)
    worker("continue", db, "t-2", tmp_path)
    fresh = workflow(worker("new", db, "t-2", tmp_path))
    assert fresh["links"] == []
    assert "gen_ai.agent.resumed" not in fresh["events"]


def test_a_forged_stamp_is_ignored(tmp_path: Path) -> None:
    """A checkpoint whose stamp is not a traceparent (written without us, by a hand or a
    hostile config): the resume gets no link and no error."""
    db = tmp_path / "checkpoints.db"
    worker("forged", db, "t-3", tmp_path)
    assert set(stamps(db, "t-3")) == {"00-<script>-x-01"}
    resumed = workflow(worker("continue", db, "t-3", tmp_path))
    assert resumed["links"] == []
