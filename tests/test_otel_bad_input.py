"""Bad input to the OpenTelemetry bridge and the command line: each is refused with an
exception that names the function and the argument (or variable), says what was wrong and
what is allowed, and leaves nothing changed; a failure inside meterage at collection time
never fails the collection."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    MetricsData,
)
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

import meterage
import meterage.otel
from meterage.otel import _attach

DELTA = {Histogram: AggregationTemporality.DELTA}


@pytest.fixture
def provider():
    """A provider with one in-memory reader; detached and shut down afterwards."""
    reader = InMemoryMetricReader()
    made = MeterProvider(metric_readers=[reader])
    yield made
    meterage.otel.detach(made)
    made.shutdown()


def hooked(reader) -> bool:
    return "_receive_metrics" in vars(reader)


def duration_count(data, operation: str) -> int:
    return sum(
        point.count
        for resource_metrics in (data.resource_metrics if data is not None else ())
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == "meterage.call.duration"
        for point in metric.data.data_points
        if point.attributes.get("meterage.operation") == operation
    )


# --- each function names itself -------------------------------------------------------


@pytest.mark.parametrize("function", ["attach", "detach"])
def test_a_provider_that_is_not_an_sdk_one_is_refused_by_name(function):
    with pytest.raises(TypeError) as raised:
        getattr(meterage.otel, function)(object())
    message = str(raised.value)
    assert message.startswith(f"meterage.otel.{function} needs an opentelemetry.sdk.metrics")
    assert "got object" in message


# --- flags are bools ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [
        ("gpu", "no", "True, False or None"),
        ("process", "yes", "True or False"),
        ("spans", 1, "True or False"),
        ("host", "1", "True, False or None"),
        ("process", None, "True or False"),
        ("gpu", 0, "True, False or None"),
    ],
)
def test_attach_takes_bools_only(provider, argument, value, allowed):
    (reader,) = provider._metric_readers
    with pytest.raises(TypeError) as raised:
        meterage.otel.attach(provider, **{argument: value})
    message = str(raised.value)
    assert message.startswith(f"meterage.otel.attach: {argument} must be {allowed}")
    assert f"got {type(value).__name__} {value!r}" in message
    # Refused before anything changed.
    assert provider not in meterage.otel.attached_providers()
    assert not hooked(reader)


@pytest.mark.parametrize(
    ("argument", "value"), [("gpu", "no"), ("process", "yes"), ("host", "1"), ("host", 1.0)]
)
def test_configure_takes_bools_only_and_builds_nothing(argument, value):
    threads = set(threading.enumerate())
    providers = meterage.otel.attached_providers()
    with pytest.raises(TypeError, match=rf"^meterage\.otel\.configure: {argument} must be True"):
        meterage.otel.configure(**{argument: value})
    assert set(threading.enumerate()) <= threads
    assert meterage.otel.attached_providers() == providers


@pytest.mark.parametrize("value", ["no", 0, None, "False"])
def test_span_attributes_enabled_is_a_bool(value):
    with pytest.raises(TypeError) as raised:
        meterage.otel.span_attributes(enabled=value)
    assert str(raised.value).startswith(
        "meterage.otel.span_attributes: enabled must be True or False"
    )


def test_span_attributes_needs_an_sdk_tracer_provider():
    from opentelemetry.trace import NoOpTracerProvider

    for wrong in (NoOpTracerProvider(), object(), "global"):
        with pytest.raises(TypeError) as raised:
            meterage.otel.span_attributes(wrong)
        message = str(raised.value)
        assert message.startswith("meterage.otel.span_attributes needs an opentelemetry.sdk")
        assert f"got {type(wrong).__name__}" in message


def test_attach_refuses_a_provider_that_was_shut_down():
    reader = InMemoryMetricReader()
    dead = MeterProvider(metric_readers=[reader])
    dead.shutdown()
    with pytest.raises(ValueError, match=r"^meterage\.otel\.attach: this MeterProvider was shut"):
        meterage.otel.attach(dead)
    assert dead not in meterage.otel.attached_providers()
    assert not hooked(reader)


# --- shutdown's timeout -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("soon", TypeError),
        (True, TypeError),
        (None, TypeError),
        (0, ValueError),
        (-1, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (2**31, ValueError),
    ],
)
def test_shutdown_timeout_is_a_positive_number_of_milliseconds(value, error):
    with pytest.raises(error) as raised:
        meterage.otel.shutdown(value)
    message = str(raised.value)
    assert message.startswith("meterage.otel.shutdown: timeout_millis must be a number")
    assert f"from 1 to {2**31 - 1}" in message


# --- reader preferences meterage cannot follow ----------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "shown", "problem"),
    [
        (ExplicitBucketHistogramAggregation([5, 1]), "[5, 1]", "strictly increasing"),
        (ExplicitBucketHistogramAggregation([1, math.nan]), "[1, nan]", "finite"),
        (ExponentialBucketHistogramAggregation(max_size=1), "max_size=1", "at least 2"),
        (ExponentialBucketHistogramAggregation(max_size=0), "max_size=0", "at least 2"),
        (ExponentialBucketHistogramAggregation(max_scale=2**40), "max_scale=", "max_scale"),
    ],
    ids=["unsorted", "nan", "one-bucket", "no-buckets", "huge-scale"],
)
def test_a_reader_whose_histograms_meterage_cannot_make_is_refused_whole(
    aggregation, shown, problem
):
    good = InMemoryMetricReader()
    bad = InMemoryMetricReader(preferred_aggregation={Histogram: aggregation})
    provider = MeterProvider(metric_readers=[good, bad])
    try:
        with pytest.raises(ValueError) as raised:
            meterage.otel.attach(provider, process=False)
        message = str(raised.value)
        assert message.startswith("meterage.otel.attach: InMemoryMetricReader prefers")
        assert shown in message and problem in message
        # Neither reader was hooked: the provider is not half attached.
        assert not hooked(good) and not hooked(bad)
        assert provider not in meterage.otel.attached_providers()
    finally:
        provider.shutdown()


# --- collection never fails because of meterage ---------------------------------------


def test_a_failing_meterage_step_is_logged_once_and_the_sdk_data_goes_out(
    provider, unique, caplog, monkeypatch
):
    (reader,) = provider._metric_readers
    meterage.otel.attach(provider, process=False)
    provider.get_meter("app").create_counter("app.requests").add(3)

    def broken(state):
        raise RuntimeError("meterage bug")

    # Fault injection into meterage's own conversion step, not into the SDK.
    monkeypatch.setattr(_attach, "collect_metrics", broken)
    with caplog.at_level(logging.ERROR, logger="meterage.otel"):
        for _ in range(3):
            data = reader.get_metrics_data()
            names = {
                metric.name
                for resource_metrics in data.resource_metrics
                for scope_metrics in resource_metrics.scope_metrics
                for metric in scope_metrics.metrics
            }
            assert "app.requests" in names  # the application's data is unchanged
            assert "meterage.call.duration" not in names
    logged = [record for record in caplog.records if record.name == "meterage.otel"]
    assert len(logged) == 1
    assert "adding metered data to this collection failed" in logged[0].getMessage()


def test_a_failing_exemplar_step_leaves_the_prometheus_scrape_whole(unique, caplog, monkeypatch):
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from prometheus_client import REGISTRY, generate_latest

    from meterage.otel import _openmetrics

    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        work = meterage.meter(name, probes=())(lambda: None)
        for _ in range(2):
            work()

        def broken(points):
            raise RuntimeError("meterage bug")

        monkeypatch.setattr(_openmetrics, "exemplars_by_bucket", broken)
        with caplog.at_level(logging.ERROR, logger="meterage.otel"):
            for _ in range(2):
                text = generate_latest(REGISTRY).decode()
                (count,) = [
                    line
                    for line in text.splitlines()
                    if line.startswith("meterage_call_duration_seconds_count") and name in line
                ]
                assert count.endswith(" 2.0")
        logged = [record for record in caplog.records if record.name == "meterage.otel"]
        assert len(logged) == 1
        assert "adding exemplars to this scrape failed" in logged[0].getMessage()
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_a_collection_without_resource_metrics_loses_no_delta(unique):
    reader = InMemoryMetricReader(preferred_temporality=DELTA)
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        work = meterage.meter(name, probes=())(lambda: None)
        for _ in range(3):
            work()
        # The hook handed a collection with nowhere to put meterage's points: it passes
        # it on unchanged and keeps the points for the next collection.
        empty = MetricsData(resource_metrics=[])
        reader._receive_metrics(empty)
        assert reader._metrics_data is empty
        assert duration_count(reader.get_metrics_data(), name) == 3
        assert duration_count(reader.get_metrics_data(), name) == 0
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


# --- the global provider --------------------------------------------------------------


def run_script(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "3600000"},
    )


def test_configure_refuses_a_global_provider_that_is_not_an_sdk_one():
    result = run_script(
        """
        import threading
        import meterage.otel
        from opentelemetry import metrics
        from opentelemetry.metrics import NoOpMeterProvider

        metrics.set_meter_provider(NoOpMeterProvider())
        threads = threading.active_count()
        try:
            meterage.otel.configure()
        except RuntimeError as error:
            print(error)
        assert threading.active_count() == threads  # no export thread was started
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "meterage.otel.configure: the global MeterProvider is already a NoOpMeterProvider"
    )


def test_configure_after_shutdown_says_why_it_cannot_start_again():
    result = run_script(
        """
        import meterage.otel

        meterage.otel.configure(process=False)
        meterage.otel.shutdown()
        try:
            meterage.otel.configure()
        except RuntimeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr
    # The console exporter printed the last export before it.
    assert result.stdout.splitlines()[-1].startswith(
        "meterage.otel.configure: the global MeterProvider was shut down"
    )


# --- the command line -----------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterage", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("port", "problem"),
    [("70000", "must be a TCP port from 1 to 65535"), ("0", "from 1 to 65535"), ("x", "not a")],
)
def test_demo_refuses_a_port_that_is_not_one(port, problem):
    result = run_cli("demo", "--serve", "--port", port, "--duration", "0.1")
    assert result.returncode == 2
    assert "argument --port" in result.stderr and problem in result.stderr


def test_demo_serve_names_a_host_that_does_not_resolve():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    result = run_cli("demo", "--serve", "--host", "no.such.host.invalid", "--duration", "0.1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "python -m meterage demo --serve: --host='no.such.host.invalid' does not resolve to "
        "an address to serve Prometheus metrics on: " + socket_error("no.such.host.invalid")
    )
    assert "Traceback" not in result.stderr


def socket_error(host: str) -> str:
    try:
        socket.getaddrinfo(host, 9464, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return str(error.strerror)
    raise AssertionError(f"{host} resolves")


def test_demo_serve_names_a_port_in_use():
    pytest.importorskip("opentelemetry.exporter.prometheus")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("demo", "--serve", "--port", str(port), "--duration", "0.1")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"python -m meterage demo --serve: cannot serve Prometheus metrics on 127.0.0.1:{port} "
        f"(--host='127.0.0.1', --port={port}): the port is in use"
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--batch-ms", "nan"), "--batch-ms must be a positive number of milliseconds, got nan"),
        (("--batch-ms", "inf"), "--batch-ms must be a positive number of milliseconds, got inf"),
        (("--batch-ms", "0"), "--batch-ms must be a positive number of milliseconds, got 0.0"),
        (("--rounds", "0"), "--rounds and --rounds-10us must be at least 1"),
    ],
)
def test_bench_refuses_bad_numbers(args, problem):
    result = run_cli("bench", *args)
    assert result.returncode == 2
    assert problem in result.stderr


def test_a_failing_native_reading_is_logged_once_and_its_values_left_out(
    unique, caplog, monkeypatch
):
    from meterage import _native

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=True, gpu=False)
    calls = []

    def failing():
        calls.append(1)
        raise OSError("no /proc here")

    monkeypatch.setattr(_native, "process_metrics", failing)
    try:
        name = unique()
        meterage.meter(name, probes=())(lambda: None)()
        with caplog.at_level(logging.WARNING):
            for collection in range(3):
                data = reader.get_metrics_data()
                names = {
                    metric.name
                    for resource_metrics in data.resource_metrics
                    for scope_metrics in resource_metrics.scope_metrics
                    for metric in scope_metrics.metrics
                }
                assert not {n for n in names if n.startswith("process.")}
                assert duration_count(data, name) == 1  # the rest of the collection is whole
                assert len(calls) == collection + 1  # one try per collection, not per metric
        failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(failures) == 1, [r.getMessage() for r in failures]
        assert failures[0].name == "meterage.otel"
        assert "no /proc here" in failures[0].getMessage()
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_shutdown_leaves_a_provider_configure_did_not_build_to_its_owner():
    result = run_script(
        """
        import meterage, meterage.otel
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        reader = InMemoryMetricReader()
        mine = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(mine)
        assert meterage.otel.configure(process=False) is mine
        meterage.meter("adopted.op", probes=())(lambda: None)()
        meterage.otel.shutdown()
        assert mine not in meterage.otel.attached_providers()
        assert not mine._shutdown  # still the application's, and still working
        mine.get_meter("app").create_counter("app.requests").add(1)
        names = {m.name for rm in reader.get_metrics_data().resource_metrics
                 for sm in rm.scope_metrics for m in sm.metrics}
        assert "app.requests" in names and "meterage.call.duration" not in names, names
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
