"""``configure()``: exporter choice, real OTLP over HTTP and gRPC into loopback receivers."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import TracerProvider

import chatter_otel
from chatter_otel import LocalTraceStore, configure, track_workflow
from chatter_otel.reference.demo import build_chat_graph
from chatter_otel.reference.local_model import LOCAL_MODEL_PRICES

if TYPE_CHECKING:
    from collections.abc import Iterator

Q = {"messages": [HumanMessage("What is the weather in Paris?")]}
OTLP_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    for name in OTLP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATTER_OTEL_TRACE_STORE", str(tmp_path / "traces.db"))
    yield
    from chatter_otel import telemetry as t

    if t._current is not None:
        t._current.shutdown()


def _run_turn() -> Any:
    with track_workflow("turn", conversation_id="conv-otlp", correlation_id="corr-otlp") as run:
        build_chat_graph().invoke(Q)
    return run


def test_default_is_the_local_trace_store(tmp_path: Any) -> None:
    tel = configure(service_name="svc", set_global=False, prices=LOCAL_MODEL_PRICES)
    assert tel.exporter_name == "local"
    assert isinstance(tel.trace_store, LocalTraceStore)
    assert tel.trace_store.path == tmp_path / "traces.db"
    run = _run_turn()
    assert tel.force_flush()
    records = tel.trace_store.trace(run.trace_id)
    assert len(records) == 8  # track_workflow + the 7 spans of the graph
    assert {r.service for r in records} == {"svc"}
    (summary,) = tel.trace_store.find(correlation_id="corr-otlp")
    assert summary.trace_id == run.trace_id
    assert summary.input_tokens == run.usage.prompt_tokens
    assert summary.output_tokens == run.usage.completion_tokens
    assert summary.cost == pytest.approx(float(run.usage.cost))
    assert summary.status == "OK" and summary.root_name == "invoke_workflow turn"


def test_configure_is_idempotent() -> None:
    first = configure(set_global=False)
    assert configure(set_global=False, service_name="other") is first
    _run_turn()
    first.force_flush()
    assert len(first.tracer_provider.resource.attributes) > 0
    first.shutdown()
    assert configure(set_global=False) is not first


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_otlp_export_over_a_real_network_hop(
    protocol: str, otlp_http: Any, otlp_grpc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = otlp_http if protocol == "http/protobuf" else otlp_grpc
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")
    tel = configure(
        service_name="chat-api", service_version="1.2.3", environment="staging",
        set_global=False, prices=LOCAL_MODEL_PRICES,
    )  # fmt: skip
    assert tel.exporter_name == "otlp" and tel.trace_store is None
    run = _run_turn()
    assert tel.force_flush()
    got = receiver.wait_for(8)
    assert len(got) == 8
    for resource, span in got:
        assert resource["service.name"] == "chat-api"
        assert resource["service.version"] == "1.2.3"
        assert resource["deployment.environment.name"] == "staging"
        # one per process: several workers' metrics stay apart at a collector
        assert str(uuid.UUID(resource["service.instance.id"])) == resource["service.instance.id"]
        assert span.trace_id.hex() == run.trace_id
        attrs = {a.key: a.value for a in span.attributes}
        assert attrs["chatter.correlation.id"].string_value == "corr-otlp"
        assert attrs["gen_ai.conversation.id"].string_value == "conv-otlp"
    assert len({resource["service.instance.id"] for resource, _ in got}) == 1
    chats = [s for _, s in got if s.name == "chat chatter-local-1"]
    assert len(chats) == 2
    tokens = {a.key: a.value.int_value for c in chats for a in c.attributes}
    assert tokens["gen_ai.usage.input_tokens"] > 0
    assert any(h.get("authorization") == "Bearer t0ken" for h in receiver.headers)


def test_collector_down_keeps_the_app_serving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    tel = configure(set_global=False)
    for _ in range(3):
        out = build_chat_graph().invoke(Q)
        assert out["messages"][-1].content.startswith("Here is what I found")
    tel.shutdown(timeout_millis=2_000)


def test_shutdown_is_bounded_when_the_collector_is_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "20")  # the SDK alone would wait ~20 s+
    tel = configure(set_global=False)
    for _ in range(3):
        build_chat_graph().invoke(Q)
    t0 = time.monotonic()
    tel.shutdown(timeout_millis=500)
    # A behaviour bound, not a speed measurement: orders of magnitude below the SDK's wait.
    assert time.monotonic() - t0 < 5
    assert "did not shut down within 500 ms" in caplog.text


def test_sdk_disabled_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tel = configure(set_global=False)
    assert tel.tracer_provider is None and tel.instrumentor is None
    with track_workflow("t") as run:
        build_chat_graph().invoke(Q)
    assert run.usage.llm_calls == 0  # nothing instrumented
    assert tel.force_flush() is True


def test_reuses_an_app_provider_without_adding_exporters() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tel = configure(tracer_provider=provider)
    assert tel.trace_store is None
    _run_turn()
    assert len(exporter.get_finished_spans()) == 8
    tel.shutdown()
    provider.shutdown()


def test_the_sinks_hang_on_one_processor_and_a_new_configure_repoints_them(
    tmp_path: Any,
) -> None:
    """The SDK calls every processor of a provider for every span (the app's SQL and server
    spans too): ``configure`` adds one for all its sinks, which looks a span's record up once.
    A second ``configure`` on the same provider points those sinks at its own services and
    adds no processor."""
    from chatter_otel.persistence import UsagePersistence
    from chatter_otel.sinks.dispatch import RecordFanout

    provider = TracerProvider()
    ledger = UsagePersistence(f"sqlite+aiosqlite:///{tmp_path}/app.db",
                              spool_path=tmp_path / "spool.db")  # fmt: skip
    tel = configure(tracer_provider=provider, persistence=ledger, prices=LOCAL_MODEL_PRICES)
    processors = list(provider._active_span_processor._span_processors)
    assert [type(p).__name__ for p in processors] == ["ValidatingBaggageSpanProcessor",
                                                      "RecordFanout"]  # fmt: skip
    fanout = processors[1]
    assert isinstance(fanout, RecordFanout)
    assert {kind: type(p).__name__ for kind, p in fanout.sinks.items()} == {
        "events": "EventSpanProcessor", "monitoring": "MonitoringSpanProcessor",
        "analytics": "AnalyticsSpanProcessor", "ledger": "LedgerSpanProcessor",
    }  # fmt: skip
    _run_turn()
    assert tel.force_flush() and ledger.flush(10)
    first = tel.monitoring
    assert first.get_workflow_stats()["workflow_ops"]["finished"] == 1
    assert ledger.stats["written"] == 3  # the run and its 2 calls
    tel.shutdown()
    again = configure(tracer_provider=provider, prices=LOCAL_MODEL_PRICES)
    assert list(provider._active_span_processor._span_processors) == processors
    _run_turn()
    assert again.force_flush()
    assert again.monitoring is not first
    assert again.monitoring.get_workflow_stats()["workflow_ops"]["finished"] == 1
    assert first.get_workflow_stats()["workflow_ops"]["finished"] == 1  # detached: no more
    assert ledger.stats["written"] == 3  # no ledger in the second configure: detached
    again.shutdown()


def test_bad_exporter_value_warns_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        tel = configure(set_global=False)
    assert tel.exporter_name == "local"
    assert "OTEL_TRACES_EXPORTER" in caplog.text


def test_inconsistent_batch_settings_warn_and_fall_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")  # smaller than the default batch of 512
    with caplog.at_level(logging.WARNING, logger="chatter_otel"):
        tel = configure(set_global=False, prices=LOCAL_MODEL_PRICES)
    assert "OTEL_BSP_" in caplog.text
    run = _run_turn()
    tel.force_flush()
    assert len(tel.trace_store.trace(run.trace_id)) == 8  # nothing lost to the bad setting


def test_public_surface() -> None:
    assert set(chatter_otel.__all__) == {
        "BudgetOptions",
        "EventOptions",
        "LangGraphInstrumentor",
        "LocalTraceStore",
        "MonitoringOptions",
        "RunIds",
        "RunUsage",
        "Telemetry",
        "WorkflowRun",
        "__version__",
        "configure",
        "last_run",
        "track_workflow",
    }
    for name in chatter_otel.__all__:  # each loads from where it lives
        assert getattr(chatter_otel, name) is not None


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_otlp_over_tls_with_a_trusted_certificate(
    otlp_http: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    # Wrap the loopback receiver's listening socket in TLS: it now speaks HTTPS only.
    host, port = otlp_http.endpoint.removeprefix("http://").split(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    otlp_http.server.socket = ctx.wrap_socket(otlp_http.server.socket, server_side=True)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"https://{host}:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", cert)
    # A system CA bundle in the environment (as in many images) must not override that CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "system-bundle.pem"))
    (tmp_path / "system-bundle.pem").write_text("")
    tel = configure(set_global=False, prices=LOCAL_MODEL_PRICES)
    run = _run_turn()
    assert tel.force_flush()
    got = otlp_http.wait_for(8)
    assert {span.trace_id.hex() for _, span in got} == {run.trace_id}
