"""The real stack for the tests: the collector running the shipped config, Jaeger v2 and
Prometheus, each a process on free loopback ports, from the binaries `make stack-bin` built.

A missing binary fails the test that needs it (with the command that builds it), never skips.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def binaries() -> dict[str, str]:
    cache = Path(os.environ.get("CHATTER_OTEL_CACHE") or Path.home() / ".cache/chatter-otel")
    env_file = cache / "stack.env"
    if not env_file.is_file():
        pytest.fail(f"{env_file} is missing: run `make stack-bin` (it builds the collector, "
                    "Jaeger and installs Prometheus)", pytrace=False)  # fmt: skip
    found = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    for name in ("OTELCOL", "JAEGER", "PROMETHEUS"):
        if not os.access(found.get(name, ""), os.X_OK):
            pytest.fail(f"{name} binary {found.get(name)!r} is missing: run `make stack-bin`",
                        pytrace=False)  # fmt: skip
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, params: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_until(check: Any, what: str, timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # a server still starting refuses or 404s
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(  # appended: a restart keeps the earlier run's log
            self.args, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            cwd=self.log.parent,
        )  # fmt: skip

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n"
                                 + self.log.read_text()[-3000:])  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


INPROCESS_JOB = "chat-api-inprocess"


@dataclass
class Stack:
    """Where the app sends OTLP, and where the tests read back."""

    otlp_grpc: str  # the collector's OTLP/gRPC receiver (http://127.0.0.1:port)
    otlp_http: str
    jaeger: str  # Jaeger's query API
    prometheus: str  # Prometheus' HTTP API
    collector_metrics: str  # the collector's Prometheus exporter (what Prometheus scrapes)
    # where an app's in-process Prometheus exporter may listen: Prometheus scrapes it as the
    # job INPROCESS_JOB (nothing answers there until a test starts one)
    app_metrics_port: int
    tempo_stand_in: Any  # an OTLP receiver where the collector's Tempo exporter sends
    procs: list[Proc] = field(default_factory=list)

    def check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()

    def promql(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        doc = http_get(f"{self.prometheus}/api/v1/query", params)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])


def start_stack(tmp: Path, tempo_stand_in: Any, decision_wait: str = "1s",
                collector_env: dict[str, str] | None = None) -> Stack:  # fmt: skip
    """Jaeger, the collector (the shipped collector/otel-collector.yaml, addresses from its
    environment variables) and Prometheus scraping it every second. A port taken between
    choosing it and binding it (an outgoing connection's ephemeral port) means a new draw."""
    for attempt in range(3):
        try:
            return _start_stack(tmp / f"run{attempt}", tempo_stand_in, decision_wait,
                                collector_env or {})  # fmt: skip
        except AssertionError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_stack(
    tmp: Path, tempo_stand_in: Any, decision_wait: str, collector_env: dict[str, str]
) -> Stack:
    tmp.mkdir(parents=True)
    bins = binaries()
    p = {k: free_port() for k in ("jq", "jqg", "jotlp", "grpc", "http", "health", "prom_exp",
                                  "self", "prom", "app")}  # fmt: skip
    jaeger = Proc("jaeger", [bins["JAEGER"], "--config", str(HERE / "jaeger.yaml")], {
        "JAEGER_QUERY_PORT": str(p["jq"]), "JAEGER_QUERY_GRPC_PORT": str(p["jqg"]),
        "JAEGER_OTLP_PORT": str(p["jotlp"]), "OTEL_TRACES_EXPORTER": "none",
        "JAEGER_BADGER_DIR": str(tmp / "jaeger-data"),
        "OTEL_SDK_DISABLED": "true",
    }, tmp / "jaeger.log")  # fmt: skip
    collector = Proc("collector", [bins["OTELCOL"], "--config",
                                   str(ROOT / "collector/otel-collector.yaml")], {
        "OTLP_GRPC_ENDPOINT": f"127.0.0.1:{p['grpc']}",
        "OTLP_HTTP_ENDPOINT": f"127.0.0.1:{p['http']}",
        "HEALTH_CHECK_ENDPOINT": f"127.0.0.1:{p['health']}",
        "PROMETHEUS_EXPORTER_ENDPOINT": f"127.0.0.1:{p['prom_exp']}",
        "COLLECTOR_METRICS_HOST": "127.0.0.1", "COLLECTOR_METRICS_PORT": str(p["self"]),
        "JAEGER_OTLP_ENDPOINT": f"127.0.0.1:{p['jotlp']}",
        "TEMPO_OTLP_ENDPOINT": tempo_stand_in.endpoint.removeprefix("http://"),
        "TAIL_SAMPLING_DECISION_WAIT": decision_wait, "SPAN_METRICS_FLUSH_INTERVAL": "1s",
        **collector_env,
    }, tmp / "collector.log")  # fmt: skip
    prom_cfg = tmp / "prometheus.yml"
    prom_cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: otel-collector\n"
        "    honor_labels: true\n"  # as collector/prometheus.yml: job = the app's service.name
        f"    static_configs: [{{targets: ['127.0.0.1:{p['prom_exp']}']}}]\n"
        f"  - job_name: {INPROCESS_JOB}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{p['app']}']}}]\n"
    )
    prometheus = Proc("prometheus", [
        bins["PROMETHEUS"], f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{p['prom']}", "--log.level=warn",
    ], {}, tmp / "prometheus.log")  # fmt: skip
    stack = Stack(
        otlp_grpc=f"http://127.0.0.1:{p['grpc']}", otlp_http=f"http://127.0.0.1:{p['http']}",
        jaeger=f"http://127.0.0.1:{p['jq']}", prometheus=f"http://127.0.0.1:{p['prom']}",
        collector_metrics=f"http://127.0.0.1:{p['prom_exp']}/metrics", app_metrics_port=p["app"],
        tempo_stand_in=tempo_stand_in, procs=[jaeger, collector, prometheus],
    )  # fmt: skip
    try:
        for proc in stack.procs:
            proc.start()
        wait_until(lambda: (stack.check_alive(), http_get(f"{stack.jaeger}/api/services"))[1],
                   "jaeger's query API")  # fmt: skip
        wait_until(lambda: (stack.check_alive(),
                            http_get(f"http://127.0.0.1:{p['health']}/"))[1],
                   "the collector's health check")  # fmt: skip
        wait_until(lambda: (stack.check_alive(),
                            http_get(f"{stack.prometheus}/api/v1/status/buildinfo"))[1],
                   "prometheus")  # fmt: skip
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    for proc in reversed(stack.procs):
        proc.stop()
