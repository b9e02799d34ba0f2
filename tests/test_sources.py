"""``trace`` / ``find`` against Jaeger and Tempo HTTP servers on loopback, in each API's shape.

The payloads are made from the spans of one real run: OTLP protobuf via the OTLP exporter's own
encoder, its proto3 JSON mapping (base64 ids, as Tempo writes), OTLP/JSON with hex ids (as Jaeger
v2's api_v3 writes), and Jaeger v1's own JSON. Every source must rebuild the tree the local store
shows.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import json_format
from langchain_core.messages import HumanMessage
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import LangGraphInstrumentor, LocalTraceStore, track_workflow
from chatter_otel.export.store import LocalStoreExporter
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES
from chatter_otel.traces.cli import main

if TYPE_CHECKING:
    from collections.abc import Iterator

SERVICE = "chat-api"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: Any) -> dict[str, Any]:
    """One real run, kept in memory and in a local store."""
    exporter = InMemorySpanExporter()
    store = LocalTraceStore(tmp_path_factory.mktemp("s") / "t.db")
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(SimpleSpanProcessor(LocalStoreExporter(store)))
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
    try:
        with track_workflow("turn", conversation_id="conv-s", correlation_id="corr-s") as run:
            build_chat_graph().invoke({"messages": [HumanMessage("weather in Tokyo")]})
    finally:
        inst.uninstrument()
    spans = exporter.get_finished_spans()
    data = TracesData(resource_spans=encode_spans(spans).resource_spans)
    return {"trace_id": run.trace_id, "spans": spans, "pb": data, "store": str(store.path)}


def _proto3_json(data: TracesData) -> dict[str, Any]:
    """The protobuf JSON mapping: base64 ids, enum names, int64 as strings (Tempo's JSON)."""
    return json_format.MessageToDict(data)


def _otlp_json_hex(data: TracesData) -> dict[str, Any]:
    """OTLP/JSON as the spec writes it: hex ids, enums as integers (Jaeger v2's api_v3)."""
    doc = json_format.MessageToDict(data, use_integers_for_enums=True)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if sp.get(key):
                        sp[key] = base64.b64decode(sp[key]).hex()
    return doc


def _jaeger_v1(spans: Any) -> dict[str, Any]:
    def tag(k: str, v: Any) -> dict[str, Any]:
        kind = {bool: "bool", int: "int64", float: "float64"}.get(type(v), "string")
        return {"key": k, "type": kind, "value": list(v) if isinstance(v, tuple) else v}

    out = []
    for s in spans:
        tags = [tag(k, v) for k, v in s.attributes.items()]
        tags.append(tag("span.kind", s.kind.name.lower()))
        if s.status.status_code.name != "UNSET":
            tags.append(tag("otel.status_code", s.status.status_code.name))
        out.append(
            {
                "traceID": f"{s.context.trace_id:032x}",
                "spanID": f"{s.context.span_id:016x}",
                "operationName": s.name,
                "references": [
                    {
                        "refType": "CHILD_OF",
                        "traceID": f"{s.context.trace_id:032x}",
                        "spanID": f"{s.parent.span_id:016x}",
                    }
                ]
                if s.parent
                else [],
                "startTime": s.start_time // 1000,
                "duration": (s.end_time - s.start_time) // 1000,
                "tags": tags,
                "processID": "p1",
            }
        )
    return {
        "data": [
            {
                "traceID": out[0]["traceID"],
                "spans": out,
                "processes": {"p1": {"serviceName": SERVICE, "tags": []}},
            }
        ],
        "errors": None,
    }


class Backend:
    """A loopback HTTP server answering from a route table; remembers the requests."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[tuple[str, dict[str, list[str]], str]] = []
        self.headers: list[dict[str, str]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parsed = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                backend.requests.append((parsed.path, query, self.headers.get("Accept", "")))
                backend.headers.append(dict(self.headers.items()))
                status, ctype, body = backend.routes.get(
                    parsed.path, (404, "application/json", b'{"error":"not found"}')
                )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def json(self, path: str, doc: Any) -> None:
        self.routes[path] = (200, "application/json", json.dumps(doc).encode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def _cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _local_tree(capsys: Any, recorded: dict[str, Any]) -> str:
    code, out, err = _cli(capsys, "trace", recorded["trace_id"], "--store", recorded["store"])
    assert code == 0, err
    return out


def _shape(tree: str) -> list[str]:
    """The tree without timings (Jaeger v1 keeps microseconds only)."""
    return [line.split("  ")[0] for line in tree.splitlines()]


def test_jaeger_v3_trace_and_find(backend: Backend, recorded: dict[str, Any], capsys: Any) -> None:
    tid = recorded["trace_id"]
    doc = {"result": _otlp_json_hex(recorded["pb"])}
    backend.json(f"/api/v3/traces/{tid}", doc)
    # FindTraces streams: one document per chunk, concatenated
    half = copy.deepcopy(doc)
    backend.routes["/api/v3/traces"] = (
        200, "application/json", (json.dumps(doc) + "\n" + json.dumps(half)).encode(),
    )  # fmt: skip
    local = _local_tree(capsys, recorded)
    code, out, err = _cli(capsys, "trace", tid, "--from", "jaeger", "--url", backend.url)
    assert code == 0, err
    assert out == local
    b64 = base64.b64encode(bytes.fromhex(tid)).decode()
    code, out, _ = _cli(capsys, "trace", b64, "--from", "jaeger", "--url", backend.url)
    assert code == 0 and out == local
    code, out, err = _cli(
        capsys, "find", "--correlation-id", "corr-s", "--from", "jaeger", "--url", backend.url,
        "--service", SERVICE, "--json",
    )  # fmt: skip
    assert code == 0, err
    (hit,) = json.loads(out)
    assert hit["trace_id"] == tid and hit["root_name"] == "invoke_workflow turn"
    path, query, _ = backend.requests[-1]
    assert path == "/api/v3/traces"
    assert query["query.service_name"] == [SERVICE]
    assert "query.start_time_min" in query and "query.start_time_max" in query
    code, _, err = _cli(
        capsys, "find", "--correlation-id", "nobody", "--from", "jaeger", "--url", backend.url,
        "--service", SERVICE,
    )  # fmt: skip
    assert code == 1 and "no trace found" in err


def test_jaeger_v1_fallback(backend: Backend, recorded: dict[str, Any], capsys: Any) -> None:
    tid = recorded["trace_id"]
    backend.json(f"/api/traces/{tid}", _jaeger_v1(recorded["spans"]))
    backend.json("/api/traces", _jaeger_v1(recorded["spans"]))
    code, out, err = _cli(capsys, "trace", tid, "--from", "jaeger", "--url", backend.url)
    assert code == 0, err
    assert _shape(out) == _shape(_local_tree(capsys, recorded))
    assert "tokens=" in out and "cost=$" in out
    code, out, err = _cli(
        capsys, "find", "--conversation-id", "conv-s", "--from", "jaeger", "--url", backend.url,
        "--service", SERVICE, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)[0]["trace_id"] == tid
    path, query, _ = backend.requests[-1]
    assert path == "/api/traces" and json.loads(query["tags"][0]) == {
        "gen_ai.conversation.id": "conv-s"
    }


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("encoding", ["json", "protobuf"])
def test_tempo(
    backend: Backend, recorded: dict[str, Any], capsys: Any, version: str, encoding: str
) -> None:
    tid = recorded["trace_id"]
    pb: TracesData = recorded["pb"]
    path = f"/api/v2/traces/{tid}" if version == "v2" else f"/api/traces/{tid}"
    if encoding == "json":
        body = _proto3_json(pb)
        doc = {"trace": body, "status": "COMPLETE"} if version == "v2" else {
            "batches": body["resourceSpans"]
        }  # fmt: skip
        backend.json(path, doc)
    else:
        raw = pb.SerializeToString()
        if version == "v2":  # TraceByIDResponse { Trace trace = 1; }
            raw = b"\x0a" + _varint(len(raw)) + raw + b"\x10\x01"
        backend.routes[path] = (200, "application/protobuf", raw)
    backend.json(
        "/api/search",
        {
            "traces": [
                {
                    "traceID": tid.lstrip("0"),
                    "rootServiceName": SERVICE,
                    "rootTraceName": "invoke_workflow turn",
                }
            ]
        },
    )
    flags = ["--from", "tempo", "--url", backend.url] + (
        ["--protobuf"] if encoding == "protobuf" else []
    )
    local = _local_tree(capsys, recorded)
    code, out, err = _cli(capsys, "trace", tid, *flags)
    assert code == 0, err
    assert out == local
    if encoding == "protobuf":
        assert backend.requests[-1][2] == "application/protobuf"
    code, out, err = _cli(capsys, "find", "--correlation-id", "corr-s", *flags, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["trace_id"] == tid
    search = next(q for p, q, _ in backend.requests if p == "/api/search")
    assert search["q"] == ['{ span.chatter.correlation.id = "corr-s" }']


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source", ["jaeger", "tempo"])
def test_backend_failures_are_one_line(backend: Backend, capsys: Any, source: str) -> None:
    tid = "0af7651916cd43dd8448eb211c80319c"
    down = f"http://127.0.0.1:{_closed_port()}"
    code, out, err = _cli(capsys, "trace", tid, "--from", source, "--url", down)
    assert (code, out) == (2, "") and f"cannot reach {source}" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "trace", tid, "--from", source, "--url", backend.url)
    assert code == 1 and "not found" in err
    for path in (f"/api/v3/traces/{tid}", f"/api/v2/traces/{tid}"):
        backend.routes[path] = (200, "application/json", b"{not json")
    code, _, err = _cli(capsys, "trace", tid, "--from", source, "--url", backend.url)
    assert code == 2 and "malformed response" in err
    for path in (f"/api/v3/traces/{tid}", f"/api/v2/traces/{tid}"):
        backend.routes[path] = (500, "text/plain", b"boom")
    code, _, err = _cli(capsys, "trace", tid, "--from", source, "--url", backend.url)
    assert code == 2 and "HTTP 500" in err
    code, _, err = _cli(capsys, "trace", tid, "--from", source)
    assert code == 2 and "--url" in err
    assert "Traceback" not in err


def test_tempo_garbage_protobuf(backend: Backend, capsys: Any) -> None:
    tid = "0af7651916cd43dd8448eb211c80319c"
    backend.routes[f"/api/v2/traces/{tid}"] = (200, "application/protobuf", b"\x0a\xff\xff")
    code, _, err = _cli(capsys, "trace", tid, "--from", "tempo", "--url", backend.url, "--protobuf")
    assert code == 2 and "malformed protobuf" in err


def test_jaeger_find_needs_a_service(backend: Backend, capsys: Any) -> None:
    code, _, err = _cli(
        capsys, "find", "--correlation-id", "x", "--from", "jaeger", "--url", backend.url
    )
    assert code == 2 and "--service" in err


def test_a_secured_backend_headers_tls_and_urls_from_the_environment(
    backend: Backend, recorded: dict[str, Any], capsys: Any, tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Jaeger behind https with its own CA and a bearer token, as people run it: the URL from
    the environment, the token by --header or the environment, the CA by --ca-bundle (or no
    check at all with --insecure); an untrusted certificate is one clear line."""
    import ssl

    from tests.test_configure import _self_signed

    tid = recorded["trace_id"]
    backend.json(f"/api/v3/traces/{tid}", {"result": _otlp_json_hex(recorded["pb"])})
    local = _local_tree(capsys, recorded)
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    backend.server.socket = ctx.wrap_socket(backend.server.socket, server_side=True)
    url = backend.url.replace("http://", "https://")
    monkeypatch.setenv("CHATTER_OTEL_JAEGER_URL", url)
    # the system's CAs do not know it: refused, saying how to trust it
    code, out, err = _cli(capsys, "trace", tid, "--from", "jaeger")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in err and "--ca-bundle" in err
    # its CA given: the same tree as the local store, with the token sent
    code, out, err = _cli(capsys, "trace", tid, "--from", "jaeger", "--ca-bundle", cert,
                          "--header", "Authorization: Bearer s3cret")  # fmt: skip
    assert code == 0 and out == local, err
    assert backend.headers[-1]["Authorization"] == "Bearer s3cret"
    # or the token from the environment (OTLP headers' form), and no check at all
    monkeypatch.setenv("CHATTER_OTEL_QUERY_HEADERS", "Authorization=Bearer%20env,X-Scope-OrgID=t1")
    code, out, _ = _cli(capsys, "trace", tid, "--from", "jaeger", "--insecure")
    assert code == 0 and out == local
    assert backend.headers[-1]["Authorization"] == "Bearer env"
    assert backend.headers[-1]["X-Scope-OrgID"] == "t1"
    # a header smuggling a second line, a bundle that is not there: one line each
    code, _, err = _cli(capsys, "trace", tid, "--from", "jaeger", "--header", "X: a\r\nY: b")
    assert code == 2 and "no line breaks" in err
    code, _, err = _cli(capsys, "trace", tid, "--from", "jaeger", "--ca-bundle", "/nope.pem")
    assert code == 2 and "cannot read the CA bundle /nope.pem" in err


def test_a_backend_needs_a_url(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATTER_OTEL_TEMPO_URL", raising=False)
    code, _, err = _cli(capsys, "trace", "a" * 32, "--from", "tempo")
    assert code == 2 and "--from tempo needs --url or CHATTER_OTEL_TEMPO_URL" in err


def test_ls_against_jaeger_and_tempo(
    backend: Backend, recorded: dict[str, Any], capsys: Any
) -> None:
    """``ls`` from a backend: its search asked with the filters as tags (Jaeger) or TraceQL
    (Tempo), the answer filtered again here, listed as from the local store."""
    tid = recorded["trace_id"]
    backend.json("/api/traces", _jaeger_v1(recorded["spans"]))
    local = json.loads(_cli(capsys, "ls", "--json", "--store", recorded["store"])[1])
    jaeger = ["--from", "jaeger", "--url", backend.url, "--service", SERVICE]
    code, out, err = _cli(capsys, "ls", *jaeger, "--json")
    assert code == 0, err

    def untimed(found: list[dict[str, Any]]) -> list[dict[str, Any]]:  # Jaeger v1 keeps µs
        return [{k: v for k, v in t.items() if k not in ("start_ns", "duration_ms")}
                for t in found]  # fmt: skip

    assert untimed(json.loads(out)) == untimed(local) and local[0]["trace_id"] == tid
    code, out, _ = _cli(capsys, "ls", *jaeger, "--model", "chatter-local-1",
                        "--conversation", "conv-s", "--since", "2h", "--json")  # fmt: skip
    assert [t["trace_id"] for t in json.loads(out)] == [tid]
    path, query, _ = backend.requests[-1]
    assert path == "/api/traces" and json.loads(query["tags"][0]) == {
        "gen_ai.conversation.id": "conv-s", "gen_ai.request.model": "chatter-local-1"}  # fmt: skip
    # a backend that ignores the error tag: the run did not fail, so nothing is listed
    code, out, _ = _cli(capsys, "ls", *jaeger, "--errors")
    assert code == 0 and out.strip() == "no failed runs"
    assert json.loads(backend.requests[-1][1]["tags"][0]) == {"error": "true"}
    code, out, _ = _cli(capsys, "ls", *jaeger, "--model", "other-model")
    assert code == 1
    # Tempo: TraceQL, then each trace
    backend.json(f"/api/v2/traces/{tid}", {"trace": _proto3_json(recorded["pb"])})
    backend.json("/api/search", {"traces": [{"traceID": tid}]})
    tempo = ["--from", "tempo", "--url", backend.url]
    code, out, err = _cli(capsys, "ls", *tempo, "--json")
    assert code == 0 and json.loads(out) == local, err
    assert next(q for p, q, _ in reversed(backend.requests) if p == "/api/search")["q"] == ["{  }"]
    _cli(capsys, "ls", *tempo, "--errors", "--model", "m")
    q = next(q for p, q, _ in reversed(backend.requests) if p == "/api/search")["q"]
    assert q == ['{ status = error && span.gen_ai.request.model = "m" }']
