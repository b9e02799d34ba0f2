"""Gateway sizing: what one gateway (collector/otel-collector.yaml + collector/gateway.yaml, the
built collector) takes, and what a trace held for ``decision_wait`` costs it in memory.

The load: chat-shaped traces (8 spans: a workflow, its nodes, 2 LLM calls and a tool call, with
the attributes ours carry), prebuilt as OTLP/gRPC requests of 64 traces and sent by
``--senders`` threads as fast as the gateway takes them; Jaeger and Tempo are stand-ins that
accept and drop (their cost is not the gateway's). Read from the gateway's own metrics:

* throughput: ``decision_wait`` 2 s (decisions all along, as in production), load for
  ``--seconds``; spans per second = spans its tail sampler took in / the time until it had
  taken in the last one;
* memory: 40,000 traces sent with ``decision_wait`` longer than the measure, so all are held;
  (resident memory - idle) / traces held = the cost of one held trace.

The load generator shares the machine (2 cores here), so the throughput is a floor.

    python -m benchmarks.bench_gateway [--seconds 20] [--senders 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

ROOT = Path(__file__).resolve().parent.parent
TRACES_PER_REQUEST = 64
SPANS = [("invoke_workflow chat", None), ("invoke_node agent", 0), ("chat gpt-4o-mini", 1),
         ("invoke_node tools", 0), ("execute_tool get_weather", 3), ("invoke_node agent", 0),
         ("chat gpt-4o-mini", 5), ("invoke_node respond", 0)]  # fmt: skip


def _kv(key: str, value: Any) -> KeyValue:
    v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=v)


def _request(rng: random.Random) -> bytes:
    now = time.time_ns()
    scope = ScopeSpans()
    for _ in range(TRACES_PER_REQUEST):
        trace_id = rng.getrandbits(128).to_bytes(16, "big")
        ids = [rng.getrandbits(64).to_bytes(8, "big") for _ in SPANS]
        for i, (name, parent) in enumerate(SPANS):
            op = name.split()[0]
            attrs = [_kv("gen_ai.operation.name", op), _kv("chatter.correlation.id", "bench"),
                     _kv("gen_ai.conversation.id", f"conv-{rng.randrange(1000)}")]  # fmt: skip
            if op == "chat":
                attrs += [_kv("gen_ai.provider.name", "openai"),
                          _kv("gen_ai.request.model", "gpt-4o-mini"),
                          _kv("gen_ai.usage.input_tokens", 23),
                          _kv("gen_ai.usage.output_tokens", 7)]  # fmt: skip
            scope.spans.append(Span(
                trace_id=trace_id, span_id=ids[i],
                parent_span_id=ids[parent] if parent is not None else b"", name=name,
                start_time_unix_nano=now, end_time_unix_nano=now + 1_000_000, attributes=attrs,
            ))  # fmt: skip
    resource = Resource(attributes=[_kv("service.name", "bench-app")])
    req = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[scope])])  # fmt: skip
    return req.SerializeToString()


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return trace_service_pb2.ExportTraceServiceResponse()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as page:
        lines = page.read().decode().splitlines()
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith(
            ("otelcol_receiver_accepted_spans", "otelcol_process_memory_rss", RECEIVED)
        ):
            name = line.split("{")[0].split(" ")[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Gateway:
    """One gateway on loopback, Jaeger and Tempo replaced by a sink."""

    def __init__(self, decision_wait: str) -> None:
        env_file = Path.home() / ".cache/chatter-otel/stack.env"
        bins = dict(line.split("=", 1) for line in env_file.read_text().split())
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Sink(), self.server)
        backend = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.tmp = tempfile.TemporaryDirectory()
        self.port, own = _free_port(), _free_port()
        env = {**os.environ, "OTLP_GRPC_ENDPOINT": f"127.0.0.1:{self.port}",
               "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{_free_port()}",
               "HEALTH_CHECK_ENDPOINT": f"127.0.0.1:{_free_port()}",
               "PROMETHEUS_EXPORTER_ENDPOINT": f"127.0.0.1:{_free_port()}",
               "COLLECTOR_METRICS_HOST": "127.0.0.1", "COLLECTOR_METRICS_PORT": str(own),
               "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{backend}",
               "TEMPO_OTLP_ENDPOINT": f"127.0.0.1:{backend}",
               "TAIL_SAMPLING_DECISION_WAIT": decision_wait,
               "QUEUE_DIR": f"{self.tmp.name}/queue"}  # fmt: skip
        args = [bins["OTELCOL"], "--config", str(ROOT / "collector/otel-collector.yaml"),
                "--config", str(ROOT / "collector/gateway.yaml")]  # fmt: skip
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        self.metrics = f"http://127.0.0.1:{own}/metrics"
        for _ in range(150):
            try:
                self.base = _own_metrics(self.metrics)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the gateway did not start")

    def received(self) -> float:
        """Traces the tail sampler has taken in."""
        return _own_metrics(self.metrics).get(RECEIVED, 0.0)

    def settle(self) -> float:
        """Wait until the sampler has taken in everything sent; when that was (monotonic)."""
        last, at = -1.0, time.monotonic()
        while True:
            now = self.received()
            if now != last:
                last, at = now, time.monotonic()
            elif time.monotonic() - at > 1.0:
                return at
            time.sleep(0.1)

    def send(self, pool: list[bytes], senders: int, until: float) -> int:
        sent = [0]
        lock = threading.Lock()

        def sender() -> None:
            channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
            export = channel.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request_serializer=lambda b: b, response_deserializer=lambda b: b,
            )  # fmt: skip
            while time.monotonic() < until:
                with lock:
                    if sent[0] >= len(pool):
                        break
                    body = pool[sent[0]]
                    sent[0] += 1
                export(body, timeout=30)
            channel.close()

        threads = [threading.Thread(target=sender) for _ in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sent[0]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.server.stop(grace=None)
        self.tmp.cleanup()


RECEIVED = "otelcol_processor_tail_sampling_new_trace_id_received"
HELD = 40_000  # traces held for the memory measure (under the sampler's num_traces, 50,000)


def run(seconds: float, senders: int) -> dict[str, float]:
    rng = random.Random(7)
    # Throughput: decisions made all along (decision_wait 2 s), as in production.
    gw = Gateway("2s")
    try:
        pool = [_request(rng) for _ in range(int(seconds * 400))]
        started = time.monotonic()
        gw.send(pool, senders, started + seconds)
        done = gw.settle()
        traces = gw.received()
    finally:
        gw.close()
    per_s = traces * len(SPANS) / (done - started)
    # Memory: HELD traces, none decided yet (decision_wait longer than the measure).
    gw = Gateway("600s")
    try:
        pool = [_request(rng) for _ in range(HELD // TRACES_PER_REQUEST)]
        gw.send(pool, senders, time.monotonic() + 600)
        gw.settle()
        held = gw.received()
        time.sleep(2)
        end = _own_metrics(gw.metrics)
    finally:
        gw.close()
    rss, idle = (
        end["otelcol_process_memory_rss"] / 2**20,
        gw.base["otelcol_process_memory_rss"] / 2**20,
    )
    return {"spans_per_s": per_s, "traces_held": held, "rss_mib": rss, "idle_rss_mib": idle,
            "kib_per_trace": (rss - idle) * 1024 / max(held, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = run(args.seconds, args.senders)
    print(
        f"gateway: {r['spans_per_s']:,.0f} spans/s accepted ({r['spans_per_s'] / 8:,.0f} "
        f"chat traces/s); {r['traces_held']:,.0f} traces held: RSS {r['rss_mib']:.0f} MiB "
        f"(idle {r['idle_rss_mib']:.0f}), {r['kib_per_trace']:.1f} KiB per held trace"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
