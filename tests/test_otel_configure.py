"""``meterage.otel.configure``: readers and exporters from the OTEL_* variables."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import textwrap
import threading
import time

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


# --- the export interval and timeout -------------------------------------------------

MAX_MS = 2**31 - 1


@pytest.mark.parametrize("variable", ["OTEL_METRIC_EXPORT_INTERVAL", "OTEL_METRIC_EXPORT_TIMEOUT"])
@pytest.mark.parametrize(
    "value", ["99999999999999999999", str(MAX_MS + 1), "0", "-5", "1e3", "1_000", "0x10", "١٢"]
)
def test_an_export_interval_or_timeout_outside_the_range_is_refused(variable, value):
    environ = {"OTEL_METRICS_EXPORTER": "console", variable: value}
    before = set(threading.enumerate())
    with pytest.raises(ValueError) as raised:
        build_provider(environ)
    message = str(raised.value)
    assert variable in message and repr(value) in message
    assert f"from 1 to {MAX_MS}" in message
    assert set(threading.enumerate()) <= before  # no export thread was started


def test_a_huge_integer_string_is_refused_quickly():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        build_provider(
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "9" * 10**6}
        )
    assert time.perf_counter() - started < 1


def test_the_largest_interval_and_timeout_keep_the_export_thread_alive():
    provider = build_provider(
        {
            "OTEL_METRICS_EXPORTER": "console",
            "OTEL_METRIC_EXPORT_INTERVAL": str(MAX_MS),
            "OTEL_METRIC_EXPORT_TIMEOUT": str(MAX_MS),
        }
    )
    try:
        (reader,) = readers_of(provider)
        assert reader._export_interval_millis == MAX_MS
        assert reader._export_timeout_millis == MAX_MS
        time.sleep(0.2)  # a wait it cannot do would have killed the thread by now
        assert reader._daemon_thread.is_alive()
    finally:
        provider.shutdown(timeout_millis=5_000)
    assert not reader._daemon_thread.is_alive()


def test_the_export_timeout_reaches_the_reader():
    provider = build_provider(
        {"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_TIMEOUT": "1234"}
    )
    try:
        (reader,) = readers_of(provider)
        assert (reader._export_interval_millis, reader._export_timeout_millis) == (60_000, 1234)
    finally:
        provider.shutdown(timeout_millis=5_000)


# --- the Prometheus endpoint ---------------------------------------------------------


def prometheus_state() -> tuple[set[threading.Thread], int]:
    """Threads running and collectors registered with prometheus_client's registry."""
    from prometheus_client import REGISTRY

    return set(threading.enumerate()), len(REGISTRY._collector_to_names)


def nothing_added(before: tuple[set[threading.Thread], int]) -> bool:
    """No thread started and no collector registered since ``before`` (a thread of an
    earlier test may have ended meanwhile)."""
    threads, collectors = prometheus_state()
    return threads <= before[0] and collectors == before[1]


def test_a_prometheus_host_that_does_not_resolve_is_named():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    before = prometheus_state()
    environ = {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "no.such.host.invalid",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(free_port()),
    }
    with pytest.raises(OSError) as raised:
        build_provider(environ)
    message = str(raised.value)
    assert "OTEL_EXPORTER_PROMETHEUS_HOST='no.such.host.invalid'" in message
    assert "does not resolve" in message
    assert isinstance(raised.value.__cause__, socket.gaierror)
    assert nothing_added(before)


@pytest.mark.parametrize("exporters", ["prometheus", "console,prometheus", "prometheus,otlp"])
def test_a_prometheus_port_in_use_is_named_and_nothing_is_left_running(exporters):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = prometheus_state()
        environ = {
            "OTEL_METRICS_EXPORTER": exporters,
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
            "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
        }
        with pytest.raises(OSError) as raised:
            build_provider(environ)
        message = str(raised.value)
        assert f"127.0.0.1:{port}" in message and "the port is in use" in message
        assert f"OTEL_EXPORTER_PROMETHEUS_PORT={port}" in message
        assert "OTEL_EXPORTER_PROMETHEUS_HOST='127.0.0.1'" in message
        assert raised.value.errno == errno.EADDRINUSE
        # No export thread, no scrape server, no collector registered.
        assert nothing_added(before)


def test_configure_that_fails_leaves_no_global_provider_and_can_be_retried():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    script = textwrap.dedent(
        """
        import os, socket, threading, urllib.request
        import meterage, meterage.otel
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        os.environ.update(OTEL_METRICS_EXPORTER="prometheus",
                          OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                          OTEL_EXPORTER_PROMETHEUS_PORT=str(port))
        threads = threading.active_count()
        try:
            meterage.otel.configure(process=False)
        except OSError as error:
            assert "the port is in use" in str(error), error
        else:
            raise AssertionError("configure() did not fail")
        assert not isinstance(metrics.get_meter_provider(), MeterProvider)
        assert meterage.otel.attached_providers() == []
        assert threading.active_count() == threads
        taken.close()
        provider = meterage.otel.configure(process=False)
        assert metrics.get_meter_provider() is provider
        meterage.meter("retried.op", probes=())(lambda: None)()
        url = f"http://127.0.0.1:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'meterage_call_duration_seconds_count{' in text, text[:2000]
        meterage.otel.shutdown()
        # shutdown() also stops the scrape server configure() started (SO_REUSEADDR: the
        # scrape's connection may still be in TIME_WAIT; a listener would still refuse).
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- the OTLP exporter's own variables -----------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "variable", "value", "problem"),
    [
        ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1", "Invalid IPv6 URL"),
        ("grpc", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "not a url", "white space"),
        ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:99999", "out of range"),
        ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "", "set but empty"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://x:1", "http:// or"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318", "http:// or"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4318", "no host"),
        ("grpc", "OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "positive number of seconds"),
        ("grpc", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "", "set but empty"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1e400", "positive number"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_TIMEOUT", "-1", "positive number"),
        ("grpc", "OTEL_EXPORTER_OTLP_COMPRESSION", "zip", "not one of gzip"),
        ("grpc", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "none", "not one of gzip"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_COMPRESSION", "br", "none, gzip, deflate"),
    ],
)
def test_bad_otlp_exporter_values_are_named_before_anything_starts(
    protocol, variable, value, problem
):
    environ = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        variable: value,
    }
    before = set(threading.enumerate())
    with pytest.raises(ValueError) as raised:
        build_provider(environ)
    assert f"{variable}={value!r}" in str(raised.value) or variable in str(raised.value)
    assert problem in str(raised.value)
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize(
    ("protocol", "variable", "value"),
    [
        ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317"),
        ("grpc", "OTEL_EXPORTER_OTLP_ENDPOINT", "unix:///tmp/collector.sock"),
        ("grpc", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "https://collector.example:4317"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT", "http://[::1]:4318"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        ("grpc", "OTEL_EXPORTER_OTLP_TIMEOUT", "2.5"),
        ("grpc", "OTEL_EXPORTER_OTLP_COMPRESSION", "GZIP"),
        ("http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "deflate"),
    ],
)
def test_good_otlp_exporter_values_are_accepted(monkeypatch, protocol, variable, value):
    module = {
        "grpc": "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
        "http/protobuf": "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    }[protocol]
    pytest.importorskip(module)
    monkeypatch.setenv(variable, value)  # the exporter itself reads the process environment
    environ = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
        variable: value,
    }
    provider = build_provider(environ)
    try:
        (reader,) = readers_of(provider)
        assert type(reader._exporter).__module__ == module
    finally:
        provider.shutdown(timeout_millis=1000)


def test_an_exporter_named_twice_is_refused():
    with pytest.raises(ValueError, match=r"OTEL_METRICS_EXPORTER='otlp, OTLP' names 'otlp'"):
        build_provider({"OTEL_METRICS_EXPORTER": "otlp, OTLP"})


@pytest.mark.parametrize(
    ("value", "item"), [("a=b,c", "'c'"), ("=x", "'=x'"), ("deployment.environment", "'deploy")]
)
def test_a_malformed_resource_attribute_is_named(value, item):
    environ = {"OTEL_METRICS_EXPORTER": "none", "OTEL_RESOURCE_ATTRIBUTES": value}
    with pytest.raises(ValueError) as raised:
        build_provider(environ)
    message = str(raised.value)
    assert message.startswith(f"OTEL_RESOURCE_ATTRIBUTES={value!r}: {item}")
    assert "is not a key=value pair" in message


def test_resource_attributes_reach_the_resource(monkeypatch):
    # Resource.create reads the process environment.
    value = "deployment.environment=prod, team=a%20b,"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", value)
    provider = build_provider({"OTEL_METRICS_EXPORTER": "none", "OTEL_RESOURCE_ATTRIBUTES": value})
    try:
        attributes = provider._sdk_config.resource.attributes
        assert (attributes["deployment.environment"], attributes["team"]) == ("prod", "a b")
    finally:
        provider.shutdown()
