"""The OpenTelemetry bridge: meterage's series reach every reader of an SDK MeterProvider."""

from __future__ import annotations

import math
import time

import pytest

otel_sdk = pytest.importorskip("opentelemetry.sdk.metrics")

from opentelemetry.sdk.metrics import Histogram, MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import (  # noqa: E402
    AggregationTemporality,
    InMemoryMetricReader,
)
from opentelemetry.sdk.metrics.view import (  # noqa: E402
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

import meterage  # noqa: E402
import meterage.otel  # noqa: E402
from meterage.otel._names import DURATION_BOUNDARIES  # noqa: E402

DELTA = {Histogram: AggregationTemporality.DELTA}
EXPONENTIAL = {Histogram: ExponentialBucketHistogramAggregation()}


@pytest.fixture
def providers():
    """Providers made by a test; detached and shut down afterwards."""
    made: list[MeterProvider] = []

    def make(*readers: InMemoryMetricReader) -> MeterProvider:
        provider = MeterProvider(metric_readers=list(readers))
        made.append(provider)
        meterage.otel.attach(provider, process=False)
        return provider

    yield make
    for provider in made:
        meterage.otel.detach(provider)
        provider.shutdown()


def metrics_of(reader: InMemoryMetricReader) -> dict[str, object]:
    """Metric name -> Metric, over every scope of one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    found = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


def points(metric, **attributes):
    return [
        point
        for point in metric.data.data_points
        if all(point.attributes.get(key) == value for key, value in attributes.items())
    ]


def test_call_metrics_have_the_documented_names_units_and_attributes(unique, providers):
    reader = InMemoryMetricReader()
    providers(reader)
    name = unique()

    @meterage.meter(name, attributes={"tier": "gold"}, sample=1.0)
    def work(fail=False):
        if fail:
            raise ValueError("no")

    for _ in range(7):
        work()
    with pytest.raises(ValueError):
        work(fail=True)

    metrics = metrics_of(reader)
    expected = {
        "meterage.call.duration": ("s", None),
        "meterage.call.cpu.time": ("s", None),
        "meterage.call.io": ("By", "io.direction"),
        "meterage.call.disk.io": ("By", "disk.io.direction"),
        "meterage.call.paging.faults": ("{fault}", "system.paging.fault.type"),
        "meterage.call.context_switches": ("{context_switch}", "process.context_switch.type"),
    }
    for metric_name, (unit, direction_key) in expected.items():
        metric = metrics[metric_name]
        assert metric.unit == unit
        ok = points(metric, **{"meterage.operation": name, "tier": "gold"})
        ok = [p for p in ok if "error.type" not in p.attributes]
        assert sum(p.count for p in ok) == 7 * (2 if direction_key else 1), metric_name
        if direction_key:
            assert {p.attributes[direction_key] for p in ok} == {
                "io.direction": {"read", "write"},
                "disk.io.direction": {"read", "write"},
                "system.paging.fault.type": {"minor", "major"},
                "process.context_switch.type": {"voluntary", "involuntary"},
            }[direction_key]
    (failed,) = points(metrics["meterage.call.duration"], **{"error.type": "ValueError"})
    assert failed.count == 1
    assert failed.attributes["meterage.operation"] == name


def test_histograms_are_explicit_by_default_with_semconv_duration_buckets(unique, providers):
    reader = InMemoryMetricReader()
    providers(reader)
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    for _ in range(5):
        work()
    (point,) = points(metrics_of(reader)["meterage.call.duration"], **{"meterage.operation": name})
    assert tuple(point.explicit_bounds) == DURATION_BOUNDARIES
    assert len(point.bucket_counts) == len(DURATION_BOUNDARIES) + 1
    # Calls of an empty function take far less than 5 ms: all in the first bucket.
    assert point.bucket_counts[0] == 5 == point.count
    assert 0 < point.min <= point.max < 0.005


def test_exponential_when_the_reader_asks_for_it(unique, providers):
    reader = InMemoryMetricReader(preferred_aggregation=EXPONENTIAL)
    providers(reader)
    tokens = meterage.histogram(unique("tokens"), unit="{token}")
    values = [1, 3, 3, 40, 512, 70_000]
    for value in values:
        tokens.record(value)
    metric = metrics_of(reader)[tokens.name]
    assert type(metric.data).__name__ == "ExponentialHistogram"
    assert metric.unit == "{token}"
    (point,) = metric.data.data_points
    assert point.count == len(values) and point.sum == sum(values)
    assert point.min == 1 and point.max == 70_000
    assert sum(point.positive.bucket_counts) + point.zero_count == len(values)
    assert len(point.positive.bucket_counts) <= 160
    # Bucket i holds (base**i, base**(i+1)]; 3 lands where 2**(2**-scale) says.
    base = 2 ** (2**-point.scale)
    first = point.positive.offset
    assert base**first < 1 <= base ** (first + 1)


def test_explicit_boundaries_set_on_the_reader_are_used(unique, providers):
    reader = InMemoryMetricReader(
        preferred_aggregation={Histogram: ExplicitBucketHistogramAggregation([10, 100])}
    )
    providers(reader)
    sizes = meterage.histogram(unique("sizes"), unit="By")
    for value in (1, 50, 50, 500):
        sizes.record(value)
    (point,) = metrics_of(reader)[sizes.name].data.data_points
    assert tuple(point.explicit_bounds) == (10.0, 100.0)
    assert list(point.bucket_counts) == [1, 2, 1]


def test_cumulative_and_delta_readers_each_get_their_own_view(unique, providers):
    cumulative = InMemoryMetricReader()
    delta = InMemoryMetricReader(preferred_temporality=DELTA)
    providers(cumulative, delta)
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    counter = meterage.counter(unique("hits"))
    counter_delta = InMemoryMetricReader(
        preferred_temporality={otel_sdk.Counter: AggregationTemporality.DELTA}
    )
    providers(counter_delta)

    def duration_count(reader):
        metric = metrics_of(reader).get("meterage.call.duration")
        found = points(metric, **{"meterage.operation": name}) if metric else []
        return sum(p.count for p in found), found

    for _ in range(3):
        work()
    counter.add(2)
    assert duration_count(cumulative)[0] == 3
    assert duration_count(delta)[0] == 3
    first_hits = metrics_of(counter_delta)[counter.name].data.data_points[0]
    assert first_hits.value == 2

    for _ in range(4):
        work()
    counter.add(5)
    cumulative_count, cumulative_points = duration_count(cumulative)
    delta_count, delta_points = duration_count(delta)
    assert cumulative_count == 7
    assert delta_count == 4
    # Delta windows start where the previous collection of that reader ended.
    assert delta_points[0].start_time_unix_nano > cumulative_points[0].start_time_unix_nano
    assert metrics_of(counter_delta)[counter.name].data.data_points[0].value == 5
    # No new calls: a delta reader gets no point for the series.
    assert duration_count(delta)[0] == 0


def test_meterage_data_arrives_also_when_the_sdk_has_none_of_its_own(unique, providers):
    reader = InMemoryMetricReader()
    providers(reader)
    meterage.meter(unique(), probes=())(lambda: None)()
    assert "meterage.call.duration" in metrics_of(reader)


def test_application_metrics_stay_in_the_same_resource(unique, providers):
    reader = InMemoryMetricReader()
    provider = providers(reader)
    provider.get_meter("app").create_counter("app.requests").add(3)
    meterage.meter(unique(), probes=())(lambda: None)()
    data = reader.get_metrics_data()
    (resource_metrics,) = data.resource_metrics
    scopes = {scope.scope.name for scope in resource_metrics.scope_metrics}
    assert {"app", "meterage"} <= scopes
    names = {m.name for s in resource_metrics.scope_metrics for m in s.metrics}
    assert {"app.requests", "meterage.call.duration"} <= names


def test_attach_is_idempotent_and_detach_undoes_it(unique):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meterage.otel.attach(provider, process=False)
        meterage.otel.attach(provider, process=False)
        meterage.meter(unique(), probes=())(lambda: None)()
        duration = metrics_of(reader)["meterage.call.duration"]
        assert sum(p.count for p in duration.data.data_points) >= 1
        # Attached twice, still one meterage scope.
        (resource_metrics,) = reader.get_metrics_data().resource_metrics
        assert [s.scope.name for s in resource_metrics.scope_metrics].count("meterage") <= 2
        assert meterage.otel.detach(provider) is True
        assert meterage.otel.detach(provider) is False
        data = reader.get_metrics_data()
        names = (
            {m.name for rm in data.resource_metrics for s in rm.scope_metrics for m in s.metrics}
            if data
            else set()
        )
        assert "meterage.call.duration" not in names
    finally:
        provider.shutdown()


def test_attach_refuses_what_is_not_an_sdk_provider():
    from opentelemetry.metrics import NoOpMeterProvider

    with pytest.raises(TypeError, match=r"opentelemetry\.sdk\.metrics\.MeterProvider"):
        meterage.otel.attach(NoOpMeterProvider())
    with pytest.raises(TypeError, match="MeterProvider"):
        meterage.otel.attach(object())  # type: ignore[arg-type]


def test_a_reset_starts_a_new_cumulative_window(unique, providers):
    reader = InMemoryMetricReader()
    providers(reader)
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    for _ in range(3):
        work()
    (before,) = points(metrics_of(reader)["meterage.call.duration"], **{"meterage.operation": name})
    reset_after = time.time_ns()
    meterage.reset()
    reset_before = time.time_ns()
    # More calls after the reset than before it: the count alone would not show the reset.
    for _ in range(5):
        work()
    (after,) = points(metrics_of(reader)["meterage.call.duration"], **{"meterage.operation": name})
    assert after.count == 5
    assert before.start_time_unix_nano < reset_after <= after.start_time_unix_nano <= reset_before


def test_prometheus_reader_scrape_never_sees_an_exponential_point(unique, providers):
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from prometheus_client import REGISTRY, generate_latest

    # The reader registers its collector in prometheus_client's global registry (and
    # removes it again at shutdown).
    reader = prometheus_exporter.PrometheusMetricReader()
    # Even a Prometheus reader that prefers exponential histograms (its scrape would fail
    # on one) gets explicit buckets from meterage.
    table = reader._instrument_class_aggregation
    for instrument in [cls for cls in table if cls.__name__ == "_Histogram"]:
        table[instrument] = ExponentialBucketHistogramAggregation()
    providers(reader)
    name = unique()
    work = meterage.meter(name, probes=("cpu",), sample=1.0)(lambda: None)
    for _ in range(4):
        work()
    text = generate_latest(REGISTRY).decode()
    count_lines = [
        line
        for line in text.splitlines()
        if line.startswith("meterage_call_duration_seconds_count") and name in line
    ]
    assert count_lines, text[:2000]
    assert float(count_lines[0].rsplit(" ", 1)[1]) == 4
    assert "meterage_call_duration_seconds_bucket" in text
    assert "meterage_call_cpu_time_seconds_bucket" in text


def test_calls_in_flight_are_an_up_down_counter(unique, providers):
    import threading

    reader = InMemoryMetricReader(preferred_temporality=DELTA)
    providers(reader)
    name = unique()
    inside = threading.Event()
    release = threading.Event()

    @meterage.meter(name, attributes={"tier": "gold"}, probes=())
    def slow():
        inside.set()
        release.wait(10)

    @meterage.meter(name, attributes={"tier": "gold"}, probes=())
    async def slow_async():
        return 1

    worker = threading.Thread(target=slow)
    worker.start()
    assert inside.wait(10)
    try:
        metric = metrics_of(reader)["meterage.calls.active"]
        (point,) = points(metric, **{"meterage.operation": name})
        assert point.value == 1
        assert point.attributes["tier"] == "gold"
        assert metric.unit == "{call}"
        assert metric.data.is_monotonic is False
        assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    finally:
        release.set()
        worker.join()
    import asyncio

    assert asyncio.run(slow_async()) == 1
    (point,) = points(metrics_of(reader)["meterage.calls.active"], **{"meterage.operation": name})
    assert point.value == 0


@pytest.mark.parametrize("exponential", [False, True], ids=["explicit", "exponential"])
def test_native_points_equal_the_sdk_constructed_ones(unique, exponential):
    """Points are made natively by filling the SDK dataclasses' fields; they must be equal,
    field for field, to points made by the classes' own constructors (the path taken for
    an SDK whose classes do not allow filling)."""
    import dataclasses

    from meterage import _native
    from meterage.otel import _convert

    name = unique()
    work = meterage.meter(name, attributes={"tier": "gold"}, probes=("io",), sample=1.0)(
        lambda: None
    )
    for _ in range(3):
        work()
    meterage.counter(unique("hits")).add(2)
    meterage.histogram(unique("sizes")).record(42)

    def state(fill: bool) -> _native.ExportState:
        classes = {
            role: (entry[0], entry[1] and fill) if isinstance(entry, tuple) else entry
            for role, entry in _convert._POINT_CLASSES.items()
        }
        assert fill is False or all(
            entry[1] for entry in _convert._POINT_CLASSES.values() if isinstance(entry, tuple)
        ), "this SDK's point classes should allow filling"
        return _native.ExportState(
            delta_histograms=False,
            delta_counters=False,
            exponential=exponential,
            max_buckets=160,
            max_scale=20,
            boundaries=None,
            call_metrics=_convert._CALL_SPECS,
            active_calls=("meterage.calls.active", "{call}", ""),
            operation_key="meterage.operation",
            default_boundaries=[0.0, 10.0, 100.0],
            point_classes=classes,
            attached_ns=1,
        )

    filled = state(True).collect(now_ns=2)
    constructed = state(False).collect(now_ns=2)
    assert [m[:4] for m in filled] == [m[:4] for m in constructed]
    assert sum(len(m[4]) for m in filled) >= 4  # duration, io read/write, counter, histogram
    for metric_filled, metric_constructed in zip(filled, constructed, strict=True):
        for made, expected in zip(metric_filled[4], metric_constructed[4], strict=True):
            assert type(made) is type(expected)
            assert made == expected
            rebuilt = type(made)(
                **{f.name: getattr(made, f.name) for f in dataclasses.fields(made)}
            )
            assert rebuilt == made
            assert (made.start_time_unix_nano, made.time_unix_nano) == (1, 2)


# --- detach, then attach again -------------------------------------------------------

DELTA_ALL = {
    Histogram: AggregationTemporality.DELTA,
    otel_sdk.Counter: AggregationTemporality.DELTA,
}


def collection(reader: InMemoryMetricReader, operation: str, counter: str):
    """One collection: the operation's `meterage.call.duration` points and the counter's
    values (none at all when the SDK collected nothing)."""
    data = reader.get_metrics_data()
    metrics = {
        metric.name: metric
        for resource_metrics in (data.resource_metrics if data is not None else ())
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
    duration = metrics.get("meterage.call.duration")
    calls = points(duration, **{"meterage.operation": operation}) if duration else []
    hits = metrics.get(counter)
    return calls, list(hits.data.data_points) if hits else []


def test_a_delta_reader_attached_again_gets_each_call_once(unique):
    reader = InMemoryMetricReader(preferred_temporality=DELTA_ALL)
    provider = MeterProvider(metric_readers=[reader])
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    hits = meterage.counter(unique("hits"))
    try:
        meterage.otel.attach(provider, process=False)
        for _ in range(10):
            work()
        hits.add(10)
        (first,), (first_hits,) = collection(reader, name, hits.name)
        assert (first.count, first_hits.value) == (10, 10)

        assert meterage.otel.detach(provider) is True
        work()
        hits.add(1)
        # Detached: the reader's collections carry none of meterage's data.
        assert collection(reader, name, hits.name) == ([], [])
        meterage.otel.attach(provider, process=False)

        (again,), (again_hits,) = collection(reader, name, hits.name)
        # Only what happened since the last export, in a window that starts where that
        # export's ended (no overlap, no gap).
        assert (again.count, again_hits.value) == (1, 1)
        assert again.start_time_unix_nano == first.time_unix_nano
        assert again_hits.start_time_unix_nano == first_hits.time_unix_nano
        assert collection(reader, name, hits.name) == ([], [])  # nothing left for later
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_a_cumulative_reader_attached_again_keeps_its_start_time(unique):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    hits = meterage.counter(unique("hits"))
    try:
        meterage.otel.attach(provider, process=False)
        for _ in range(10):
            work()
        hits.add(10)
        (first,), (first_hits,) = collection(reader, name, hits.name)
        meterage.otel.detach(provider)
        work()
        hits.add(1)
        meterage.otel.attach(provider, process=False)
        (again,), (again_hits,) = collection(reader, name, hits.name)
        # One cumulative window across the detach: same start, counts go on from 10.
        assert (again.count, again_hits.value) == (11, 11)
        assert again.start_time_unix_nano == first.start_time_unix_nano
        assert again_hits.start_time_unix_nano == first_hits.start_time_unix_nano
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_reattaching_a_delta_otlp_exporter_sends_each_call_once(unique):
    pytest.importorskip("grpc")
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from otlp_receiver import GrpcReceiver

    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    with GrpcReceiver() as receiver:
        exporter = OTLPMetricExporter(
            endpoint=receiver.endpoint,
            insecure=True,
            timeout=5,
            preferred_temporality=DELTA_ALL,
        )
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
        provider = MeterProvider(metric_readers=[reader])

        def exported_calls() -> int:
            before = len(receiver.requests)
            assert provider.force_flush(10_000)
            requests = receiver.requests[before:]
            return sum(
                point.count
                for request in requests
                for resource in request.resource_metrics
                for scope in resource.scope_metrics
                for metric in scope.metrics
                if metric.name == "meterage.call.duration"
                for point in metric.histogram.data_points
                if any(kv.value.string_value == name for kv in point.attributes)
            )

        try:
            meterage.otel.attach(provider, process=False)
            for _ in range(10):
                work()
            assert exported_calls() == 10
            meterage.otel.detach(provider)
            work()
            meterage.otel.attach(provider, process=False)
            assert exported_calls() == 1
            assert exported_calls() == 0
        finally:
            meterage.otel.detach(provider)
            provider.shutdown(5_000)


def test_a_dropped_reader_frees_its_export_state(unique):
    import gc
    import weakref

    from meterage.otel import _attach

    reader = InMemoryMetricReader(preferred_temporality=DELTA_ALL)
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    meterage.meter(unique(), probes=())(lambda: None)()
    assert reader.get_metrics_data() is not None
    meterage.otel.detach(provider)
    provider.shutdown()
    state = weakref.ref(_attach._reader_states[reader])
    del provider, reader
    gc.collect()
    assert state() is None


@pytest.mark.parametrize(
    "attributes",
    [{"flag": True}, {"ratio": 0.5, "shard": 3}, {"tier..name": "gold"}, {"1st": "x"}],
    ids=["bool", "numbers", "repeated-separators", "leading-digit"],
)
def test_exemplars_reach_series_whose_labels_the_exporter_rewrites(unique, attributes):
    """The Prometheus exporter writes non-string values as JSON (true, 0.5) and sanitizes
    label names its own way; exemplars must still find their bucket."""
    prometheus_exporter = pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import REGISTRY
    from prometheus_client.openmetrics.exposition import generate_latest

    tracing = TracerProvider()
    assert meterage.otel.span_attributes(tracing) is True
    reader = prometheus_exporter.PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meterage.otel.attach(provider, process=False)
    try:
        name = unique()
        work = meterage.meter(name, attributes=attributes, probes=())(lambda: None)
        with tracing.get_tracer("test").start_as_current_span("scraped") as span:
            work()
            context = span.get_span_context()
        lines = [
            line
            for line in generate_latest(REGISTRY).decode().splitlines()
            if line.startswith("meterage_call_duration_seconds_bucket") and name in line
        ]
        (with_exemplar,) = [line for line in lines if " # {" in line]
        assert 'le="0.005"' in with_exemplar
        assert f'span_id="{context.span_id:016x}"' in with_exemplar
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
        meterage.otel.span_attributes(enabled=False)
        tracing.shutdown()


def metric_names(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    return {
        metric.name
        for resource_metrics in (data.resource_metrics if data is not None else ())
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }


def test_detach_stops_the_process_and_host_metrics_too():
    from meterage.otel._host import HOST_METRIC_NAMES
    from meterage.otel._process import PROCESS_METRIC_NAMES

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meterage.otel.attach(provider, process=True, gpu=False, host=True)
        names = metric_names(reader)
        assert "process.cpu.time" in names and "system.cpu.time" in names
        meterage.otel.detach(provider)
        # Their instruments stay on the provider (the SDK cannot remove them), empty.
        names = metric_names(reader)
        assert not names & {*PROCESS_METRIC_NAMES, *HOST_METRIC_NAMES, "meterage.series"}
        meterage.otel.attach(provider, process=True, gpu=False, host=True)
        assert {"process.cpu.time", "system.cpu.time"} <= metric_names(reader)
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


def test_a_later_attach_chooses_the_metric_groups_again():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meterage.otel.attach(provider, process=False, gpu=False, host=False)
        names = metric_names(reader)
        assert "meterage.series" in names and "process.cpu.time" not in names
        meterage.otel.attach(provider, process=True, gpu=False, host=True)
        assert {"process.cpu.time", "system.cpu.time"} <= metric_names(reader)
        meterage.otel.attach(provider, process=False, gpu=False, host=False)
        names = metric_names(reader)
        assert "meterage.series" in names
        assert "process.cpu.time" not in names and "system.cpu.time" not in names
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()


@pytest.mark.parametrize("temporality", ["delta", "cumulative"])
def test_a_reset_while_detached_is_seen_at_the_next_attach(unique, temporality):
    preferred = DELTA_ALL if temporality == "delta" else {}
    reader = InMemoryMetricReader(preferred_temporality=preferred)
    provider = MeterProvider(metric_readers=[reader])
    name = unique()
    work = meterage.meter(name, probes=())(lambda: None)
    hits = meterage.counter(unique("hits"))
    try:
        meterage.otel.attach(provider, process=False)
        for _ in range(5):
            work()
        hits.add(5)
        (first,), (first_hits,) = collection(reader, name, hits.name)
        assert (first.count, first_hits.value) == (5, 5)
        meterage.otel.detach(provider)
        reset_after = time.time_ns()
        meterage.reset()
        for _ in range(2):
            work()
        hits.add(2)
        meterage.otel.attach(provider, process=False)
        (again,), (again_hits,) = collection(reader, name, hits.name)
        # Only what was recorded since the reset.
        assert (again.count, again_hits.value) == (2, 2)
        if temporality == "delta":
            # Delta windows stay contiguous: this one starts where the last export ended.
            assert again.start_time_unix_nano == first.time_unix_nano
            assert again_hits.start_time_unix_nano == first_hits.time_unix_nano
        else:
            # A new cumulative window, started by the reset.
            assert again.start_time_unix_nano >= reset_after
            assert again_hits.start_time_unix_nano >= reset_after
    finally:
        meterage.otel.detach(provider)
        provider.shutdown()
