"""What the README and the docs promise: every Python block runs as printed, the configuration
reference names every option the code has, and the site builds strict (``make test``)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_examples import CodeExample, find_examples

import chatter_otel
from chatter_otel.instrumentation.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
_OTEL_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
             "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")  # fmt: skip


@pytest.mark.parametrize(
    "example", list(find_examples(str(ROOT / "README.md"), str(ROOT / "docs"))), ids=str
)
def test_every_python_block_runs_as_printed(example: CodeExample, tmp_path: Path) -> None:
    """Each block in a fresh interpreter of its own, as a reader would paste it into a file:
    blocks set process-wide things (the global tracer provider) that must not leak."""
    env = {k: v for k, v in os.environ.items() if k not in _OTEL_ENV}
    script = tmp_path / "example.py"
    script.write_text(example.source)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, f"{example}:\n{out.stderr[-3000:]}"


def test_the_readme_is_a_guide() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text
    assert not re.search(r"\bissue\b|\bsession\b|workplace", text, re.IGNORECASE)
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


def test_the_configuration_reference_names_every_option() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    keywords = [*inspect.signature(chatter_otel.configure).parameters,
                *inspect.signature(Settings.resolve).parameters]  # fmt: skip
    from dataclasses import fields

    from chatter_otel import BudgetOptions, EventOptions, MonitoringOptions

    keywords += [f"{cls.__name__}.{f.name}" for cls in (MonitoringOptions, EventOptions,
                 BudgetOptions) for f in fields(cls)]  # fmt: skip
    missing = [k for k in keywords if f"`{k}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
    for env in re.findall(
        r'"((?:CHATTER_OTEL|OTEL)_[A-Z_]+)"',
        (ROOT / "chatter_otel" / "instrumentation" / "settings.py").read_text(),
    ):
        assert env in doc, env
