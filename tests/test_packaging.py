"""Installs like an OpenTelemetry package: ranges not pins, a typed and licensed wheel, a
complete sdist, and import errors that name the extra to install."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "-q", "--sdist", "--wheel", "--outdir",
                    str(out), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, out.iterdir())],
                   check=True, capture_output=True)  # fmt: skip
    return out


def test_the_wheel_is_typed_licensed_and_declares_ranges(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith("METADATA"))).decode())
    assert "chatter_otel/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Development Status") for c in classifiers)
    assert any(u.startswith("Homepage, https://") for u in meta.get_all("Project-URL") or [])
    requires = meta.get_all("Requires-Dist") or []
    otel = [r for r in requires if r.startswith("opentelemetry")]
    # ranges, not exact pins (the markers of extras read `extra == "..."`)
    assert otel and not any("==" in r.split(";")[0] for r in otel), otel
    extras = set(meta.get_all("Provides-Extra") or [])
    assert extras == {"instruments", "grpc", "zero-code", "fastapi", "persistence", "redis",
                      "httpx", "prometheus", "reference"}  # fmt: skip
    base = [r for r in requires if "extra ==" not in r]
    assert not [
        r
        for r in base
        if r.startswith(("langgraph", "langchain", "opentelemetry-exporter-otlp-proto-grpc"))
    ]
    assert "test" not in extras  # test tools are a dependency group, not published
    assert any(r.startswith("sqlalchemy") and "<2.2" in r.replace(" ", "") for r in requires)


def _closure(requirements: list[str]) -> set[str]:
    """The distributions a set of requirements pulls in (every one is installed in this venv),
    as pip would resolve them on this Python, extras' markers evaluated."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        wanted = [(name, e) for e in ("", *sorted(req.extras))]
        for key in wanted:
            if f"{key[0]}[{key[1]}]" in seen:
                continue
            seen.add(f"{key[0]}[{key[1]}]")
            for sub in distribution(req.name).requires or []:
                todo.append((Requirement(sub), key[1]))
    return {k.split("[")[0] for k in seen}


def test_the_no_extras_install_is_light(dist: Path) -> None:
    """pip install chatter-otel (no extras) pulls in at most 45 distributions, itself included:
    no gRPC (OTLP over HTTP is the default), no LangGraph or LangChain (the app's own)."""
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist()
                                             if n.endswith("METADATA"))).decode())  # fmt: skip
    base = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    closure = _closure(base) | {"chatter-otel"}
    assert len(closure) <= 45, sorted(closure)
    assert not {"grpcio", "langgraph", "langchain-core", "langsmith"} & closure, sorted(closure)


def test_the_sdist_holds_what_builds_and_tests_it(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("LICENSE", "tests/conftest.py", "constraints.txt", "Makefile",
                   "collector/otel-collector.yaml", "scripts/services.sh", "docs/decisions.md",
                   "benchmarks/bench_overhead.py", "chatter_otel/py.typed"):  # fmt: skip
        assert needed in names, needed


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=False)  # fmt: skip


def test_a_missing_extra_is_named() -> None:
    # as on a base install: SQLAlchemy is not importable
    out = _run("import sys; sys.modules['sqlalchemy'] = None\nimport chatter_otel.persistence")
    assert out.returncode == 1
    assert "needs the 'persistence' extra: pip install 'chatter-otel[persistence]'" in out.stderr


def test_configure_with_an_app_but_no_fastapi_extra_logs_and_carries_on() -> None:
    out = _run(
        "import sys, logging; logging.basicConfig()\n"
        "sys.modules['opentelemetry.instrumentation.fastapi'] = None\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "import chatter_otel\n"
        "tel = chatter_otel.configure(tracer_provider=TracerProvider(), app=object())\n"
        "print('configured', tel is not None)\n"
        "tel.shutdown()\n"
    )
    assert out.returncode == 0, out.stderr
    assert "configured True" in out.stdout
    assert "needs the 'fastapi' extra" in out.stderr


EXIT_APP = """
import os, sys, time
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: down
os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = sys.argv[1]
from langchain_core.messages import HumanMessage
import chatter_otel
from chatter_otel.reference.demo import build_chat_graph
tel = chatter_otel.configure(service_name="exit-test")
for _ in range(3):
    build_chat_graph().invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
print(time.time(), flush=True)
tel.shutdown(2000)
"""


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_shutdown_bounds_the_process_exit_too(protocol: str) -> None:
    """With the collector down, shutdown(2000) returns at 2 s and the process exits right
    after (the SDK's own exit-time shutdown, unbounded, no longer runs again)."""
    import time

    proc = subprocess.run([sys.executable, "-c", EXIT_APP, protocol], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    exited = time.time()
    assert proc.returncode == 0, proc.stderr
    called = float(proc.stdout.strip().splitlines()[-1])
    assert exited - called < 3.0, exited - called  # was 2 s + 4.9 s


def test_the_cli_fits_a_terminal_and_says_its_version() -> None:
    from chatter_otel.version import __version__

    out = subprocess.run([sys.executable, "-m", "chatter_otel", "--version"],
                         capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    assert out.stdout.strip() == f"chatter-otel {__version__}"
    for command in ([], ["demo"], ["serve"], ["trace"], ["find"]):
        help_ = subprocess.run([sys.executable, "-m", "chatter_otel", *command, "--help"],
                               capture_output=True, text=True, check=True, cwd=ROOT,
                               env={**__import__("os").environ, "COLUMNS": "80"})  # fmt: skip
        lines = help_.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
        assert "``" not in help_.stdout  # no reST markup
        options = [x.strip() for x in lines if x.strip().startswith("--")]
        for option in options:  # every option has a help text (on its line or the next)
            i = lines.index(next(x for x in lines if x.strip() == option or
                                 x.strip().startswith(option + " ")))  # fmt: skip
            assert len(option.split("  ")) > 1 or lines[i + 1].startswith(" " * 10), option


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from chatter_otel.traces.spans import SpanRecord, console, tree

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    recs = [SpanRecord("ab" * 16, "cd" * 8, None, "invoke_workflow w", 0, 10**6, "ERROR")]
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    piped, term = io.StringIO(), Terminal()
    console(piped).print(tree(recs))
    console(term).print(tree(recs))
    assert "\x1b[" not in piped.getvalue() and "invoke_workflow w" in piped.getvalue()
    assert "\x1b[" in term.getvalue()  # red for the failed span
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    console(plain).print(tree(recs))
    assert "\x1b[3" not in plain.getvalue()  # no colour codes (bold may stay)


def test_the_dockerfile_copies_what_the_build_needs(tmp_path: Path) -> None:
    """The image installs the package from exactly the files its COPY lines bring (no Docker
    engine here: the same build, from the same files)."""
    import shutil

    copied: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    for name in copied:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name)
        else:
            shutil.copy(src, tmp_path / name)
    out = subprocess.run([sys.executable, "-m", "build", "-q", "--wheel", "--outdir",
                          str(tmp_path / "dist"), str(tmp_path)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((tmp_path / "dist").glob("chatter_otel-*.whl"))
