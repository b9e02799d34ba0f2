from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chatter_otel import LangGraphInstrumentor

if TYPE_CHECKING:
    from collections.abc import Iterator

# The test services (scripts/services.sh): private PostgreSQL and Redis on ports of their own.
PG_PORT = int(os.environ.get("CHATTER_OTEL_PG_PORT", "55432"))
REDIS_PORT = int(os.environ.get("CHATTER_OTEL_REDIS_PORT", "56379"))
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"


class Spans:
    """Finished spans of one test, with lookups that fail loudly."""

    def __init__(self, provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
        self.provider = provider
        self.exporter = exporter

    @property
    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"expected one {name!r}, got {[s.name for s in self.all]}"
        return found[0]

    def starting(self, prefix: str) -> list[ReadableSpan]:
        return [s for s in self.all if s.name.startswith(prefix)]

    def by_id(self, span_id: int) -> ReadableSpan:
        return next(s for s in self.all if s.context.span_id == span_id)

    def parent_of(self, span: ReadableSpan) -> ReadableSpan | None:
        if span.parent is None:
            return None
        return next((s for s in self.all if s.context.span_id == span.parent.span_id), None)

    def children(self, span: ReadableSpan) -> list[ReadableSpan]:
        sid = span.context.span_id
        kids = [s for s in self.all if s.parent is not None and s.parent.span_id == sid]
        return sorted(kids, key=lambda s: s.start_time or 0)

    def clear(self) -> None:
        self.exporter.clear()


def token_points(reader: Any, scope: str | None = None) -> Iterator[Any]:
    """The data points of ``gen_ai.client.token.usage`` a metric reader holds, of ``scope``
    (an instrumentation scope's name) or of every scope."""
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            if scope is not None and sm.scope.name != scope:
                continue
            for metric in sm.metrics:
                if metric.name == "gen_ai.client.token.usage":
                    yield from metric.data.data_points


def token_sum(reader: Any, scope: str | None = None) -> int:
    """``gen_ai.client.token.usage`` summed over ``scope`` (else every scope)."""
    return sum(int(p.sum) for p in token_points(reader, scope))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "internal_errors: the test injects faults into the instrumentation on purpose"
    )


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """A fault inside the instrumentation fails the test that caused it (production only logs
    it): the suite sees internal errors the way logfire's re-raise under pytest does."""
    from chatter_otel import _safety

    errors = _safety.internal_errors
    errors.strict = True
    # Each test sees its own log lines: the once-a-minute limiter starts fresh.
    _safety._limiter = _safety._RateLimiter()
    errors.seen.clear()
    yield
    seen, errors.seen[:] = list(errors.seen), []
    if seen and request.node.get_closest_marker("internal_errors") is None:
        pytest.fail("internal errors in chatter-otel:\n" + "\n".join(seen), pytrace=False)


@pytest.fixture
def instrument() -> Iterator[Any]:
    """Instrument with a fresh SDK provider; call it with options; always uninstrumented after."""
    inst = LangGraphInstrumentor()
    holder: dict[str, Spans] = {}

    def _do(**options: Any) -> Spans:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        inst.instrument(tracer_provider=provider, **options)
        holder["spans"] = Spans(provider, exporter)
        return holder["spans"]

    yield _do
    inst.uninstrument()


@pytest.fixture
def spans(instrument: Any) -> Spans:
    from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

    return instrument(prices=LOCAL_MODEL_PRICES)


# -- an OpenAI-compatible chat completions server on loopback --------------------------------


@dataclass
class FakeOpenAI:
    """What the loopback server answers and what it received."""

    url: str
    content: str = "Hello from loopback."
    model: str = "gpt-4o-mini-2024-07-18"
    usage: dict[str, Any] = field(
        default_factory=lambda: {
            "prompt_tokens": 23,
            "completion_tokens": 7,
            "total_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    )
    embedding_model: str = "text-embedding-3-small"
    status: int = 200
    error_message: str = "boom"  # the error body's message when status is not 200
    # Scripted tool calls: each chat request takes the next entry, if any, and answers with
    # those calls (name, arguments) instead of content; an agent's loop then runs the tools.
    tool_calls: deque[list[tuple[str, dict[str, Any]]]] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _next_calls(fake: FakeOpenAI) -> list[dict[str, Any]] | None:
    try:
        calls = fake.tool_calls.popleft()
    except IndexError:
        return None
    return [
        {"id": f"call_{i}_{name}", "type": "function",
         "function": {"name": name, "arguments": json.dumps(args)}}
        for i, (name, args) in enumerate(calls)
    ]  # fmt: skip


def _completion(fake: FakeOpenAI, req: dict[str, Any]) -> dict[str, Any]:
    calls = _next_calls(fake)
    message: dict[str, Any] = {"role": "assistant", "content": fake.content}
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
    return {
        "id": "chatcmpl-loopback-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": fake.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}
        ],
        "usage": fake.usage,
    }


def _chunks(fake: FakeOpenAI, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
    base = {
        "id": "chatcmpl-loopback-2",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": fake.model,
    }
    calls = _next_calls(fake)
    if calls:
        deltas = [{"index": i, **c} for i, c in enumerate(calls)]
        delta: dict[str, Any] = {"role": "assistant", "tool_calls": deltas}
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    else:
        for i, word in enumerate(fake.content.split(" ")):
            delta = {"content": (" " if i else "") + word}
            if i == 0:
                delta["role"] = "assistant"
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    done = {"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls else "stop"}
    yield {**base, "choices": [done]}
    if (req.get("stream_options") or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": fake.usage}


def _embeddings(fake: FakeOpenAI, req: dict[str, Any], inputs: list[Any]) -> dict[str, Any]:
    # One token per whitespace-separated word: a usage the tests can compute from the input.
    tokens = sum(len(str(text).split()) for text in inputs)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))
        ],
        "model": fake.embedding_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append(body)
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            if fake.status != 200:
                payload = json.dumps(
                    {"error": {"message": fake.error_message, "type": "server_error"}}
                )
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())
                return
            if self.path.endswith("/embeddings"):
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                payload = json.dumps(_embeddings(fake, body, inputs)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if body.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in _chunks(fake, body):
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
                return
            payload = json.dumps(_completion(fake, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that hung up mid-stream is what some tests do on purpose

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


# -- OTLP receivers on loopback, built on opentelemetry-proto ---------------------------------


@dataclass
class Received:
    """Export requests an OTLP receiver got, decoded."""

    endpoint: str
    requests: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    server: Any = None

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                out.extend((res, span) for ss in rs.scope_spans for span in ss.spans)
        return out

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.spans()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return self.spans()


@pytest.fixture
def otlp_http() -> Iterator[Received]:
    import gzip

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    received = Received(endpoint="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            assert self.path == "/v1/traces"
            received.requests.append(ExportTraceServiceRequest.FromString(body))
            received.headers.append(dict(self.headers))
            payload = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    received.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    received.server = server
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def start_grpc_receiver(port: int = 0) -> tuple[Received, Any]:
    """An OTLP/gRPC trace receiver on 127.0.0.1:port (0: any); returns it and its server."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = Received(endpoint="")

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            received.requests.append(request)
            received.headers.append(dict(context.invocation_metadata()))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    received.endpoint = f"http://127.0.0.1:{bound}"
    return received, server


@pytest.fixture
def otlp_grpc() -> Iterator[Received]:
    received, server = start_grpc_receiver()
    try:
        yield received
    finally:
        server.stop(grace=None)


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Until something accepts connections on 127.0.0.1:port; fails the test otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


@contextmanager
def rotel_forwarding(grpc_port: int, http_port: int, to: str, log_dir: Any) -> Iterator[None]:
    """The rotel collector binary: OTLP/gRPC and OTLP/HTTP receivers on loopback, forwarding
    over gRPC to the receiver at ``to``; up (both ports listening) inside the block."""
    import rotel

    exe = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    proc = subprocess.Popen(
        [exe, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
         "--otlp-http-endpoint", f"127.0.0.1:{http_port}", "--exporter", "otlp",
         "--otlp-exporter-endpoint", to, "--otlp-exporter-protocol", "grpc",
         "--pid-file", str(log_dir / "rotel.pid"), "--log-file", str(log_dir / "rotel.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(grpc_port)
        wait_port(http_port)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def store(tmp_path: Any) -> Iterator[Any]:
    """A local trace store, and the instrumentor writing every span of ours into it."""
    from chatter_otel import LocalTraceStore
    from chatter_otel.export.store import LocalStoreExporter
    from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

    local = LocalTraceStore(tmp_path / "t.db")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(LocalStoreExporter(local)))
    inst = LangGraphInstrumentor()
    inst.instrument(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
    yield local
    inst.uninstrument()
    provider.shutdown()
