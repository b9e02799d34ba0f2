"""The incident CLI's parsers are total: whatever a backend answers, ``trace``/``find`` print a
tree or one line on stderr with exit 2; never a traceback. Property-based (hypothesis) over
Jaeger v3 (OTLP JSON, hex ids), Jaeger v1, Tempo v2 and v1 (proto3 JSON, base64 ids), Tempo
search and protobuf, mutated from the payloads of one real run; plus a minute of it."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatter_otel.traces.backends import JaegerSource, TempoSource
from chatter_otel.traces.cli import main
from chatter_otel.traces.decode import SourceError
from chatter_otel.traces.spans import render
from tests.test_sources import _jaeger_v1, _otlp_json_hex, _proto3_json, recorded

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["recorded"]  # the module fixture: one real run

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw: Any, doc: Any) -> Any:
    """``doc`` with 1-4 random edits: a value replaced by any JSON, a key or item removed, a
    number turned into a string, a container emptied."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths[1:] or paths))
        if not path:
            doc = draw(JSON)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, op = path[-1], draw(st.sampled_from(["replace", "delete", "stringify", "empty"]))
        if op == "delete":
            del parent[key]
        elif op == "stringify":
            parent[key] = str(parent[key])
        elif op == "empty":
            parent[key] = type(parent[key])() if isinstance(parent[key], dict | list) else None
        else:
            parent[key] = draw(JSON)
    return doc


def _outcome(run: Callable[[], Any]) -> str:
    """What the CLI does with it: render, or one SourceError. Anything else fails the test."""
    try:
        result = run()
    except SourceError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return "error"
    if isinstance(result, list) and result and hasattr(result[0], "span_id"):
        render(result)
    return "ok"


def _jaeger(bodies: dict[str, bytes | None]) -> JaegerSource:
    src = JaegerSource("http://127.0.0.1:9", service="chat-api")
    src._get = lambda path, params=None, accept="": bodies.get(path.split("?")[0])  # type: ignore[method-assign]
    return src


def _tempo(bodies: dict[str, bytes | None], protobuf: bool = False) -> TempoSource:
    src = TempoSource("http://127.0.0.1:9", protobuf=protobuf)
    src._get = lambda path, params=None, accept="": bodies.get(path.split("?")[0])  # type: ignore[method-assign]
    return src


def _cases(rec: dict[str, Any]) -> dict[str, Callable[[Any], Callable[[], Any]]]:
    tid = rec["trace_id"]

    def enc(doc: Any) -> bytes:
        return json.dumps(doc, allow_nan=True).encode()

    return {
        "jaeger_v3": lambda doc: lambda: _jaeger({f"/api/v3/traces/{tid}": enc(doc)}).trace(tid),
        "jaeger_v1": lambda doc: lambda: _jaeger({f"/api/traces/{tid}": enc(doc)}).trace(tid),
        "tempo_v2": lambda doc: lambda: _tempo({f"/api/v2/traces/{tid}": enc(doc)}).trace(tid),
        "tempo_v1": lambda doc: lambda: _tempo({f"/api/traces/{tid}": enc(doc)}).trace(tid),
        "jaeger_find": lambda doc: lambda: _jaeger({"/api/v3/traces": enc(doc)}).find(
            correlation_id="corr-s"),
        "tempo_find": lambda doc: lambda: _tempo({"/api/search": enc(doc), f"/api/v2/traces/{tid}":
            enc({"trace": _proto3_json(rec["pb"])})}).find(correlation_id="corr-s"),
    }  # fmt: skip


def _seeds(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "jaeger_v3": {"result": _otlp_json_hex(rec["pb"])},
        "jaeger_v1": _jaeger_v1(rec["spans"]),
        "tempo_v2": {"trace": _proto3_json(rec["pb"])},
        "tempo_v1": _proto3_json(rec["pb"]),
        "jaeger_find": {"result": _otlp_json_hex(rec["pb"])},
        "tempo_find": {"traces": [{"traceID": rec["trace_id"]}]},
    }


FORMATS = ["jaeger_v3", "jaeger_v1", "tempo_v2", "tempo_v1", "jaeger_find", "tempo_find"]


def test_the_seeds_render(recorded: dict[str, Any]) -> None:
    cases, seeds = _cases(recorded), _seeds(recorded)
    for name in FORMATS:
        assert _outcome(cases[name](seeds[name])) == "ok", name


def _property(recorded: dict[str, Any], name: str, examples: int) -> Callable[[], None]:
    case, seed = _cases(recorded)[name], _seeds(recorded)[name]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(doc=mutated(seed) | JSON)
    def check(doc: Any) -> None:
        _outcome(case(doc))

    return check


@st.composite
def _mangled(draw: Any, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op, i = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(max_size=8))
    return bytes(data)


def _protobuf_property(recorded: dict[str, Any], examples: int) -> Callable[[], None]:
    tid = recorded["trace_id"]
    raw = recorded["pb"].SerializeToString()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=_mangled(raw), wrapped=st.booleans())
    def check(body: bytes, wrapped: bool) -> None:
        wrapper = b"\x0a" + _varint(len(body)) + body if wrapped else body
        path = f"/api/v2/traces/{tid}" if wrapped else f"/api/traces/{tid}"
        _outcome(lambda: _tempo({path: wrapper}, protobuf=True).trace(tid))

    return check


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("name", FORMATS)
def test_mutated_responses_never_crash(recorded: dict[str, Any], name: str) -> None:
    _property(recorded, name, 300)()


def test_mutated_protobuf_never_crashes(recorded: dict[str, Any]) -> None:
    _protobuf_property(recorded, 300)()


def test_a_minute_of_hypothesis_over_every_parser(recorded: dict[str, Any]) -> None:
    """The issue's bar: a 60-second hypothesis run over the CLI's parsers finds nothing."""
    checks = [_property(recorded, name, 100) for name in FORMATS]
    checks.append(_protobuf_property(recorded, 100))
    end, rounds = time.monotonic() + 60, 0
    while time.monotonic() < end:
        checks[rounds % len(checks)]()
        rounds += 1
    assert rounds >= len(checks)


_NO_SPAN_ID = {"result": {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 7}]}]}]}}


@pytest.mark.parametrize(
    ("name", "doc"),
    [
        ("tempo_v1", {"resourceSpans": 5}),
        ("tempo_find", {"traces": ["x"]}),
        ("jaeger_v1", {"data": [{"spans": [{"tags": [{"key": 1}]}]}]}),
        ("jaeger_v3", _NO_SPAN_ID),
    ],
)  # fmt: skip
def test_the_issue_s_crashing_shapes_are_one_line_errors(
    recorded: dict[str, Any], name: str, doc: Any
) -> None:
    assert _outcome(_cases(recorded)[name](doc)) == "error"


def test_deep_nesting_and_a_cost_sent_as_a_string(recorded: dict[str, Any]) -> None:
    tid = recorded["trace_id"]
    deep = b'{"result": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _outcome(lambda: _jaeger({f"/api/v3/traces/{tid}": deep}).trace(tid)) == "error"
    doc = _proto3_json(recorded["pb"])
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                sp.setdefault("attributes", []).append(
                    {"key": "gen_ai.usage.cost.amount", "value": {"stringValue": "0.5"}}
                )
    recs = _tempo({f"/api/traces/{tid}": json.dumps(doc).encode()}).trace(tid)
    assert "cost=$" not in render(recs) or "0.5000000" not in render(recs)


# -- over the network: the deadline and the size cap ---------------------------------------------


class _Evil(BaseHTTPRequestHandler):
    mode = "trickle"

    def do_GET(self) -> None:
        try:
            if self.mode == "huge":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                chunk = b" " * 2**20
                for _ in range(200):  # 200 MB of white space, then nothing
                    self.wfile.write(chunk)
            else:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(1000):  # a header byte every 0.2 s: 200 s in all
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def evil_server() -> Iterator[Callable[[str], str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), _Evil)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def url(mode: str) -> str:
        _Evil.mode = mode
        return f"http://127.0.0.1:{port}"

    yield url
    server.shutdown()


def test_a_trickling_backend_is_cut_off_at_the_deadline(
    evil_server: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code = main(["trace", "ab" * 16, "--from", "jaeger", "--url", evil_server("trickle"),
                 "--timeout", "2s"])  # fmt: skip
    assert code == 2 and time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not answer within 2 s" in err


def test_a_huge_response_is_refused_within_the_cap(
    evil_server: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main(["trace", "ab" * 16, "--from", "tempo", "--url", evil_server("huge"),
                 "--max-response-mb", "8"])  # fmt: skip
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert code == 2 and "sent more than 8 MiB" in capsys.readouterr().err
    assert grew_mb < 64
