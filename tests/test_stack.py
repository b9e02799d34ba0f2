"""The deployment stack, checked without Docker: files parse, components exist in the pinned
collector release, pipelines are wired, ports and hostnames agree, the compose file is valid
Compose, and the dashboard only queries metrics the app or the collector produces."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import compose_spec
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR = ROOT / "collector"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(ROOT / "docker-compose.yml")


def _with_defaults(text: str) -> str:
    """The collector config as compose runs it: ``${env:NAME:-default}`` -> its default."""
    return re.sub(r"\$\{env:[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def otel() -> dict[str, Any]:
    text = (COLLECTOR / "otel-collector.yaml").read_text()
    assert "${env:" in text  # addresses come from the environment (the stack tests set them)
    config = yaml.safe_load(_with_defaults(text))
    assert "${" not in json.dumps(config), "a variable without a default"
    return dict(config)


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return dict(_yaml(COLLECTOR / "builder-config.yaml"))


def test_every_file_parses() -> None:
    files = [
        *ROOT.glob("docker-compose.yml"),
        *COLLECTOR.rglob("*.yaml"),
        *COLLECTOR.rglob("*.yml"),
    ]
    assert len(files) >= 7
    for path in files:
        assert isinstance(_yaml(path), dict), path
    for path in COLLECTOR.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


def test_compose_is_valid_compose_spec() -> None:
    parsed = compose_spec.PyCompose.from_yaml((ROOT / "docker-compose.yml").read_text())
    parsed.validate()
    assert set(parsed.service_names()) == {
        "otel-collector", "jaeger", "tempo", "prometheus", "grafana", "postgres", "redis", "app",
        "otel-agent", "gateway-1", "gateway-2", "gateway-3",
    }  # fmt: skip


def test_the_scaled_profile_wires_agents_to_gateways(compose: dict) -> None:
    """``--profile scaled``: the agent routes to exactly the gateways compose runs, each on the
    one-host config with gateway.yaml over it, its queue on a volume of its own; Prometheus
    scrapes every gateway; Jaeger keeps its traces on a volume."""
    services = compose["services"]
    scaled = {n for n, s in services.items() if "scaled" in s.get("profiles", [])}
    gateways = sorted(n for n in scaled if n.startswith("gateway-"))
    assert scaled == {"otel-agent", *gateways} and len(gateways) == 3
    routed = yaml.safe_load(services["otel-agent"]["environment"]["GATEWAYS"])
    agent = _yaml(COLLECTOR / "agent.yaml")
    grpc = agent["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    receiver_port = _hostport(_with_defaults(grpc))[1]
    assert routed == [f"{g}:{receiver_port}" for g in gateways]
    queues = set()
    for g in gateways:
        svc = services[g]
        assert svc["command"] == ["--config=/etc/otelcol-contrib/config.yaml",
                                  "--config=/etc/otelcol-contrib/gateway.yaml"]  # fmt: skip
        mounts = {v.split(":")[0]: v.split(":")[1] for v in svc["volumes"]}
        assert mounts["./collector/otel-collector.yaml"] == "/etc/otelcol-contrib/config.yaml"
        assert mounts["./collector/gateway.yaml"] == "/etc/otelcol-contrib/gateway.yaml"
        queue = next(v for v in svc["volumes"] if v.endswith(":/var/lib/otelcol/gateway"))
        queues.add(queue.split(":")[0])
        assert svc["environment"]["GATEWAY_NAME"] == g
    assert len(queues) == 3  # a queue of its own each
    prom = _yaml(COLLECTOR / "prometheus.yml")
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}  # fmt: skip
    assert {f"{g}:8889" for g in gateways} <= targets
    assert any(v.endswith(":/var/lib/jaeger") for v in services["jaeger"]["volumes"])
    jaeger = _yaml(COLLECTOR / "jaeger.yaml")
    (store,) = jaeger["extensions"]["jaeger_storage"]["backends"].values()
    assert store["badger"]["directories"]["keys"].startswith("/var/lib/jaeger/")


def test_collector_image_matches_the_builder_manifest(compose: dict, manifest: dict) -> None:
    version = manifest["dist"]["version"]
    assert compose["services"]["otel-collector"]["image"] == (
        f"otel/opentelemetry-collector-contrib:{version}"
    )
    for kind in ("receivers", "processors", "exporters", "connectors", "extensions"):
        for component in manifest[kind]:
            assert component["gomod"].endswith(f" v{version}"), component  # one release


def test_jaeger_image_is_the_jaeger_the_tests_build(compose: dict) -> None:
    script = (ROOT / "scripts/stack-bin.sh").read_text()
    v2 = re.search(r"^JAEGER_V2=(\S+)$", script, re.MULTILINE)
    assert v2 is not None
    assert compose["services"]["jaeger"]["image"] == f"jaegertracing/jaeger:{v2[1]}"


def _type(name: str) -> str:
    return name.split("/", 1)[0]


_SUFFIX = {"receivers": "receiver", "processors": "processor", "exporters": "exporter",
           "connectors": "connector", "extensions": "extension"}  # fmt: skip


def test_the_manifest_builds_exactly_the_components_used(otel: dict, manifest: dict) -> None:
    """Checked here by name (a module provides the type its name says), over the one-host,
    agent and gateway configs; tests/test_real_stack.py checks it on the built binary
    (`otelcol components`)."""
    configs = [otel, _yaml(COLLECTOR / "agent.yaml"), _yaml(COLLECTOR / "gateway.yaml")]
    for kind, suffix in _SUFFIX.items():
        modules = {c["gomod"].split()[0].rsplit("/", 1)[-1].removesuffix(suffix)
                   for c in manifest[kind]}  # fmt: skip
        used = {_type(n).replace("_", "") for cfg in configs for n in cfg.get(kind) or {}}
        provided = {t for t in used if any(t == m or t.startswith(m) for m in modules)}
        assert provided == used, f"{kind}: {used - provided} not built"
        assert all(any(t == m or t.startswith(m) for t in used) for m in modules), (
            f"{kind}: a module nothing uses"
        )


def test_pipelines_refer_only_to_defined_components(otel: dict) -> None:
    service = otel["service"]
    assert set(service["extensions"]) <= set(otel["extensions"])
    connectors = set(otel.get("connectors") or {})
    used_as_exporter: set[str] = set()
    used_as_receiver: set[str] = set()
    for name, pipeline in service["pipelines"].items():
        assert _type(name) in {"traces", "metrics", "logs"}, name
        for r in pipeline["receivers"]:
            assert r in otel["receivers"] or r in connectors, (name, r)
            if r in connectors:
                used_as_receiver.add(r)
        for p in pipeline.get("processors", []):
            assert p in otel["processors"], (name, p)
        for e in pipeline["exporters"]:
            assert e in otel["exporters"] or e in connectors, (name, e)
            if e in connectors:
                used_as_exporter.add(e)
    # every connector joins two pipelines; every defined component is used somewhere
    assert used_as_exporter == used_as_receiver == connectors
    used = {c for p in service["pipelines"].values() for k in ("receivers", "processors",
            "exporters") for c in p.get(k, [])}  # fmt: skip
    for kind in ("receivers", "processors", "exporters"):
        assert set(otel[kind]) <= used, f"unused {kind}: {set(otel[kind]) - used}"
    # metrics are derived before sampling: the connectors read the unsampled pipeline
    traces_in = service["pipelines"]["traces/in"]
    assert "tail_sampling" not in traces_in["processors"]
    assert {"span_metrics", "signal_to_metrics"} <= set(traces_in["exporters"])
    assert "tail_sampling" in service["pipelines"]["traces/sampled"]["processors"]
    assert service["pipelines"]["traces/in"]["processors"][0] == "memory_limiter"


def test_tail_sampling_keeps_errors_slow_expensive_and_a_baseline(otel: dict) -> None:
    policies = {p["type"]: p for p in otel["processors"]["tail_sampling"]["policies"]}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["latency"]["latency"]["threshold_ms"] > 0
    assert policies["numeric_attribute"]["numeric_attribute"]["key"] == "gen_ai.usage.input_tokens"
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100


def _hostport(url: str) -> tuple[str, int]:
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _container_ports(service: dict) -> set[int]:
    return {int(p.rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def test_ports_and_hostnames_agree(compose: dict, otel: dict) -> None:
    services = compose["services"]
    known_ports = {
        # ports the images listen on without being published (internal network only)
        "jaeger": {4317, 4318, 16686},
        "tempo": {3200, 4317},
        "prometheus": {9090},
        "otel-collector": {4317, 4318, 8889, 13133},
    }
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            host_ip = mapping.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {mapping} beyond loopback"
    # collector -> Jaeger and Tempo
    for exporter in ("otlp_grpc/jaeger", "otlp_grpc/tempo"):
        host, port = _hostport(otel["exporters"][exporter]["endpoint"])
        assert host in services and port in known_ports[host], exporter
    # the collector's receivers and exporter ports are the ones compose publishes
    receivers = otel["receivers"]["otlp"]["protocols"]
    ports = {_hostport(receivers[p]["endpoint"])[1] for p in ("grpc", "http")}
    ports.add(_hostport(otel["exporters"]["prometheus"]["endpoint"])[1])
    ports.add(_hostport(otel["extensions"]["health_check"]["endpoint"])[1])
    assert ports == _container_ports(services["otel-collector"])
    # Prometheus scrapes the collector's exporter
    prom = _yaml(COLLECTOR / "prometheus.yml")
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert f"otel-collector:{_hostport(otel['exporters']['prometheus']['endpoint'])[1]}" in targets
    # Tempo: receives OTLP gRPC where the collector sends it, writes metrics to Prometheus
    tempo = _yaml(COLLECTOR / "tempo.yaml")
    tempo_grpc = _hostport(
        tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    )
    assert tempo_grpc[1] == _hostport(otel["exporters"]["otlp_grpc/tempo"]["endpoint"])[1]
    (rw,) = tempo["metrics_generator"]["storage"]["remote_write"]
    assert _hostport(rw["url"]) == ("prometheus", 9090)
    assert "--web.enable-remote-write-receiver" in services["prometheus"]["command"]
    assert tempo["server"]["http_listen_port"] in _container_ports(services["tempo"])
    # Grafana's data sources point at the services and their ports
    ds = _yaml(COLLECTOR / "grafana/provisioning/datasources/datasources.yaml")["datasources"]
    for source in ds:
        host, port = _hostport(source["url"])
        assert host in services and port in known_ports[host], source["name"]
    uids = {s["uid"] for s in ds}
    tempo_ds = next(s for s in ds if s["type"] == "tempo")
    assert tempo_ds["jsonData"]["tracesToMetrics"]["datasourceUid"] in uids
    prom_ds = next(s for s in ds if s["type"] == "prometheus")
    assert prom_ds["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"] in uids
    # the app exports to the collector's gRPC port
    env = services["app"]["environment"]
    assert _hostport(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", 4317)
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert "@postgres:5432/" in env["CHATTER_DATABASE_URL"]
    assert _hostport(env["CHATTER_REDIS_URL"]) == ("redis", 6379)


def test_images_pinned_volumes_named_no_default_passwords(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), name
    named = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert source.startswith("./") or source in named, (name, vol)
    text = (ROOT / "docker-compose.yml").read_text()
    assert "GF_SECURITY_ADMIN_PASSWORD: ${GRAFANA_ADMIN_PASSWORD:?" in text
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    for name in ("prometheus", "grafana", "postgres", "redis", "app"):
        assert "healthcheck" in compose["services"][name], name


def _collector_metrics(otel: dict) -> set[str]:
    """Prometheus names of what the collector derives: spanmetrics and signaltometrics output
    after the Prometheus exporter's translation (dots -> underscores, units, _total)."""
    ns = otel["connectors"]["span_metrics"]["namespace"].replace(".", "_")
    unit = {"s": "seconds", "ms": "milliseconds"}[
        otel["connectors"]["span_metrics"]["histogram"]["unit"]
    ]
    names = {f"{ns}_calls_total", f"{ns}_duration_{unit}_bucket", f"{ns}_duration_{unit}_sum",
             f"{ns}_duration_{unit}_count"}  # fmt: skip
    for m in otel["connectors"]["signal_to_metrics"]["spans"]:
        base = m["name"].replace(".", "_") + (f"_{m['unit']}" if "unit" in m else "")
        assert "sum" in m, m["name"]  # one counter: the cost per conversation
        names.add(base + "_total")
    return names


def _app_metrics() -> dict[str, set[str]]:
    """Prometheus names of the app's own metrics, as the SDK's Prometheus exporter gives them
    (the collector's gives the same: tests/test_real_stack.py), with their label names."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY

    from chatter_otel.instrumentation.records import ToolCallRecord, WorkflowRecord
    from chatter_otel.instrumentation.runs import EMPTY_IDS
    from chatter_otel.sinks.metrics import GenAIMetrics

    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        # what record() reads of an LLM call record, every optional part present
        rec: Any = SimpleNamespace(operation="chat", provider="openai", request_model="m",
                                   response_model="m", duration_s=0.1, input_tokens=1,
                                   output_tokens=2, time_to_first_chunk_s=0.05,
                                   chunk_gaps_s=(0.01,), cost=Decimal(1))  # fmt: skip
        metrics = GenAIMetrics(provider)
        metrics.record(rec, "TimeoutError")
        common = ("0" * 16, "0" * 32, None, EMPTY_IDS, 0, 10**9, "OK", None, None)
        metrics.record_run(WorkflowRecord(*common, "chat", True, 1, 2, 3, None, None, None, None,
                                          1, 1), None)  # fmt: skip
        metrics.record_run(WorkflowRecord(*common, "support", True, 1, 2, 3, None, None, None,
                                          None, 1, 1, agent=True), None)  # fmt: skip
        metrics.record_run(ToolCallRecord(*common, "get_weather", None), "TimeoutError")
        out: dict[str, set[str]] = {}
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name.startswith(("gen_ai_", "chatter_")):
                    out[sample.name] = set(sample.labels)
        return out
    finally:
        provider.shutdown()


def test_dashboard_reads_the_names_the_app_and_the_collector_give(otel: dict) -> None:
    """Every metric a panel reads is the app's own (under the names its in-process exporter
    and the collector's both give) or derived by the collector; every label one is filtered or
    grouped by exists on what it reads; every variable is defined."""
    app = _app_metrics()
    derived = _collector_metrics(otel)
    assert {"gen_ai_client_token_usage_sum", "gen_ai_client_operation_duration_seconds_bucket",
            "chatter_gen_ai_cost_USD_total"} <= set(app)  # fmt: skip
    dash = json.loads((COLLECTOR / "grafana/dashboards/chatter-genai.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"DS_PROMETHEUS", "service", "environment", "model"}
    functions = {"sum", "rate", "increase", "histogram_quantile", "topk", "by", "le", "or",
                 "vector", "on", "group_left", "group", "job", "instance"}  # fmt: skip
    labels = {"job", "instance", "le"}
    for names in app.values():
        labels |= names
    dims = {d["name"].replace(".", "_") for d in otel["connectors"]["span_metrics"]["dimensions"]}
    for m in otel["connectors"]["signal_to_metrics"]["spans"]:
        dims |= {a["key"].replace(".", "_") for a in m["attributes"]}
    labels |= dims | {"status_code", "deployment_environment_name"}  # the last: target_info's
    read: set[str] = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            text = target["expr"]
            assert set(re.findall(r"\$(\w+)", text)) <= set(variables), panel["title"]
            expr = re.sub(r"\{[^}]*\}", "", text)  # drop label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # and ranges
            expr = re.sub(r"(by|on) \([^)]*\)", "", expr)
            for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if ident not in functions:
                    assert ident in app or ident in derived or ident == "target_info", (
                        f"{panel['title']}: {ident} is never produced")  # fmt: skip
                    read.add(ident)
            for group in re.findall(r"(?:by|on) \(([^)]*)\)", text):
                for name in filter(None, (n.strip() for n in group.split(","))):
                    assert name in labels, (panel["title"], name)
            for name in re.findall(r"(\w+)(?:=~|!=|=)\"", text):
                assert name in labels, (panel["title"], name)
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("tokens", "cost", "calls", "error", "latency", "first chunk", "conversations"):
        assert topic in titles, topic
    # only the cost per conversation is the collector's: everything else reads the app's own
    assert read & derived == {"chatter_gen_ai_conversation_cost_USD_total"}


def test_the_dashboard_imports_into_an_existing_grafana() -> None:
    """Grafana's import form asks for the data source (``__inputs``); provisioned, the same
    ``${DS_PROMETHEUS}`` is a data-source variable that picks the default Prometheus."""
    dash = json.loads((COLLECTOR / "grafana/dashboards/chatter-genai.json").read_text())
    (ds_input,) = dash["__inputs"]
    assert ds_input == {**ds_input, "name": "DS_PROMETHEUS", "type": "datasource",
                        "pluginId": "prometheus"}  # fmt: skip
    assert {r["id"] for r in dash["__requires"]} == {"grafana", "prometheus", "timeseries",
                                                    "table"}  # fmt: skip
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for name in ("service", "environment", "model"):
        v = variables[name]
        assert v["datasource"] == ref and v["includeAll"] and v["allValue"] == ".*", name
    for panel in dash["panels"]:
        assert panel["datasource"] == ref, panel["title"]
        assert all(t["datasource"] == ref for t in panel["targets"]), panel["title"]
    assert "prometheus" not in json.dumps(dash["panels"]).replace('"type": "prometheus"', "")


def test_collector_config_mentions_only_contract_attribute_names(otel: dict) -> None:
    from chatter_otel import attributes

    text = (COLLECTOR / "otel-collector.yaml").read_text()
    ours = {v for k, v in vars(attributes).items() if k.isupper() and isinstance(v, str)}
    for name in re.findall(r'attributes\["([^"]+)"\]', text):
        assert name in ours or name.startswith("gen_ai."), name


def test_rotel_on_the_compose_ports_and_protocols(
    compose: dict, otel: dict, otlp_grpc: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The app's OTLP settings from the compose file, sent through a real collector binary
    (rotel) listening on the collector's OTLP ports from otel-collector.yaml."""
    import socket

    from langchain_core.messages import HumanMessage

    from chatter_otel import configure, track_workflow
    from chatter_otel.reference.demo import build_chat_graph
    from tests.conftest import rotel_forwarding

    protocols = otel["receivers"]["otlp"]["protocols"]
    grpc_port = _hostport(protocols["grpc"]["endpoint"])[1]
    http_port = _hostport(protocols["http"]["endpoint"])[1]
    for port in (grpc_port, http_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken on this machine"
    with rotel_forwarding(grpc_port, http_port, otlp_grpc.endpoint, tmp_path):
        env = compose["services"]["app"]["environment"]
        _, port = _hostport(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", env["OTEL_EXPORTER_OTLP_PROTOCOL"])
        monkeypatch.setenv("OTEL_SERVICE_NAME", env["OTEL_SERVICE_NAME"])
        tel = configure(set_global=False)
        try:
            with track_workflow("turn", correlation_id="compose-1") as run:
                build_chat_graph().invoke({"messages": [HumanMessage("weather in Oslo")]})
            tel.force_flush()
            got = otlp_grpc.wait_for(8, timeout=20)
        finally:
            tel.shutdown()
    assert len(got) == 8
    assert {span.trace_id.hex() for _, span in got} == {run.trace_id}
    assert {res["service.name"] for res, _ in got} == {"chatter-reference-app"}
