"""``meterage.otel.configure``: readers and exporters from the OTEL_* variables."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ConsoleMetricExporter,
    PeriodicExportingMetricReader,
)

from meterage.otel._configure import build_provider, exporter_names


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def readers_of(provider):
    return list(provider._metric_readers)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ["otlp"]),
        ("none", []),
        ("console", ["console"]),
        ("Prometheus, otlp", ["prometheus", "otlp"]),
        ("console,none", ["console"]),
    ],
)
def test_exporter_lists(value, expected):
    assert exporter_names({"OTEL_METRICS_EXPORTER": value} if value else {}) == expected


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_METRICS_EXPORTER": "zipkin"}, "OTEL_METRICS_EXPORTER"),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "udp"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        ),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes",
            },
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        ),
        (
            {
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "linear",
            },
            "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "soon"},
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "-5"},
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
        (
            {"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "70000"},
            "OTEL_EXPORTER_PROMETHEUS_PORT",
        ),
    ],
)
def test_a_bad_value_names_its_variable(environ, variable):
    with pytest.raises(ValueError, match=variable):
        build_provider(environ)


def test_none_builds_a_provider_without_readers():
    provider = build_provider({"OTEL_METRICS_EXPORTER": "none"})
    try:
        assert readers_of(provider) == []
    finally:
        provider.shutdown()


def test_console_gets_a_periodic_reader_at_the_interval():
    provider = build_provider(
        {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "1234"}
    )
    try:
        (reader,) = readers_of(provider)
        assert isinstance(reader, PeriodicExportingMetricReader)
        assert isinstance(reader._exporter, ConsoleMetricExporter)
        assert reader._export_interval_millis == 1234
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("protocol", "module"),
    [
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"),
        ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.metric_exporter"),
    ],
)
def test_otlp_protocols_choose_their_exporter(monkeypatch, protocol, module):
    pytest.importorskip(module)
    # The exporter itself reads the temporality preference from the process environment.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    environ = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta",
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
    }
    provider = build_provider(environ)
    try:
        (reader,) = readers_of(provider)
        assert type(reader._exporter).__module__ == module
        temporality = {
            cls.__name__: value for cls, value in reader._instrument_class_temporality.items()
        }
        assert temporality["_Histogram"] == AggregationTemporality.DELTA
    finally:
        provider.shutdown(timeout_millis=1000)


def test_prometheus_endpoint_serves_meterage_metrics():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    port = free_port()
    script = textwrap.dedent(
        f"""
        import os, sys, urllib.request
        os.environ.update(OTEL_METRICS_EXPORTER="prometheus",
                          OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                          OTEL_EXPORTER_PROMETHEUS_PORT="{port}",
                          OTEL_SERVICE_NAME="configure-test")
        import meterage, meterage.otel
        from opentelemetry import metrics
        provider = meterage.otel.configure(process=False)
        assert metrics.get_meter_provider() is provider
        assert meterage.otel.configure() is provider
        work = meterage.meter("configured.op", probes=())(lambda: None)
        for _ in range(6):
            work()
        text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read()
        sys.stdout.write(text.decode())
        meterage.otel.shutdown()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = [
        line
        for line in result.stdout.splitlines()
        if line.startswith("meterage_call_duration_seconds_count") and "configured.op" in line
    ]
    assert lines, result.stdout[:3000]
    assert float(lines[0].rsplit(" ", 1)[1]) == 6
    # OTEL_SERVICE_NAME reached the resource (Prometheus shows it on target_info).
    (target,) = [line for line in result.stdout.splitlines() if line.startswith("target_info{")]
    assert 'service_name="configure-test"' in target
